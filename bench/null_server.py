"""The framework's ceiling: a bare aiohttp handler that reads the body and returns fixed JSON.

    python bench/null_server.py --port 8080
"""

from __future__ import annotations

import argparse

from aiohttp import web

_ANSWER = (b'{"KeyId":"arn:aws:kms:us-east-1:111122223333:key/'
           b'00000000-0000-0000-0000-000000000000",'
           b'"Plaintext":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",'
           b'"EncryptionAlgorithm":"SYMMETRIC_DEFAULT"}')


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=_ANSWER, content_type="application/x-amz-json-1.1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
