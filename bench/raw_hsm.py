"""The raw HSM: AES-256-GCM operations per second through python-pkcs11 on SoftHSM2, no HTTP.

One thread (python-pkcs11 initialises SoftHSM2 without locking: FACTS.md §0.1),
one session, one AES-256 session key; 32-byte plaintexts with a 34-byte AAD, as
a Decrypt of a data key has. Prints one JSON line.

    SOFTHSM2_CONF=... BENCH_PIN=... python bench/raw_hsm.py --module ... --token-label bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag
from pkcs11.mechanisms import GCMParams


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentiles(samples: list[int]) -> dict[str, float]:
    samples.sort()
    pick = lambda q: samples[min(len(samples) - 1, int(q / 100 * len(samples)))] / 1000  # noqa: E731
    return {"p50": pick(50), "p90": pick(90), "p99": pick(99), "max": samples[-1] / 1000}


def bench(call, duration: float) -> dict[str, float]:  # noqa: ANN001 - a zero-arg callable
    latencies: list[int] = []
    cpu0, start = _cpu(), time.perf_counter()
    deadline = start + duration
    clock = time.perf_counter_ns
    while True:
        for _ in range(200):
            t0 = clock()
            call()
            latencies.append(clock() - t0)
        if time.perf_counter() >= deadline:
            break
    wall, cpu = time.perf_counter() - start, _cpu() - cpu0
    return {"ops": len(latencies), "seconds": wall, "ops_per_s": len(latencies) / wall,
            "cpu_us_per_op": cpu / len(latencies) * 1e6, "cores": cpu / wall,
            "latency_us": _percentiles(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--module", required=True)
    parser.add_argument("--token-label", required=True)
    parser.add_argument("--duration", type=float, default=6.0)
    args = parser.parse_args()
    session = pkcs11.lib(args.module).get_token(token_label=args.token_label).open(
        user_pin=os.environ["BENCH_PIN"], rw=True)
    key = session.generate_key(KeyType.AES, 256, store=False,
                               capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                               template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
    nonce, aad, plaintext = os.urandom(12), os.urandom(34), os.urandom(32)
    sealed = bytes(key.encrypt(plaintext, mechanism=Mechanism.AES_GCM,
                               mechanism_param=GCMParams(nonce, aad, 128)))

    def decrypt() -> None:
        key.decrypt(sealed, mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(nonce, aad, 128))

    def encrypt() -> None:
        key.encrypt(plaintext, mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(os.urandom(12), aad, 128))

    assert bytes(key.decrypt(sealed, mechanism=Mechanism.AES_GCM,
                             mechanism_param=GCMParams(nonce, aad, 128))) == plaintext
    result = {"threads": 1, "decrypt": bench(decrypt, args.duration),
              "encrypt": bench(encrypt, min(args.duration, 2.0))}
    session.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
