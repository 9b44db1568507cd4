"""The `kmsd` command: serve a node, run a dev cluster, prepare an HSM token."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from kmsd import config as config_module
from kmsd import log_setup

INIT_ACCESS_KEY_ENV = "KMSD_INIT_ACCESS_KEY_ID"
INIT_SECRET_ENV = "KMSD_INIT_SECRET_ACCESS_KEY"


def _open_partition(config_path: str):  # -> HsmPartition
    from kmsd.hsm.partition import HsmPartition

    cfg = config_module.load(config_path)
    if cfg.softhsm2_conf:
        os.environ["SOFTHSM2_CONF"] = cfg.softhsm2_conf
    return HsmPartition(cfg.hsm_module, cfg.token_label, cfg.pin.read("HSM PIN"))


def _cmd_serve(args: argparse.Namespace) -> int:
    from kmsd.node import serve

    cfg = config_module.load(args.config)
    log_setup.configure(cfg.node_id)
    asyncio.run(serve(cfg, args.config))
    return 0


def _cmd_api_worker(args: argparse.Namespace) -> int:
    from kmsd.api_workers.worker import serve_worker

    cfg = config_module.load(args.config)
    log_setup.configure(cfg.node_id, process_fields={"api_worker": args.index})
    asyncio.run(serve_worker(cfg, args.fd, args.index))
    return 0


def _cmd_dev(args: argparse.Namespace) -> int:
    from kmsd.dev.cluster import DevClusterOptions, run_dev_cluster

    regions = tuple(r.strip() for r in args.region.split(",") if r.strip())
    return run_dev_cluster(DevClusterOptions(
        nodes=args.nodes, data_dir=args.data_dir, base_port=args.port,
        account_id=args.account_id, regions=regions, access_key_id=args.access_key_id,
        secret_access_key=args.secret_access_key, scheduler_interval=args.scheduler_interval,
        test_clock=args.test_clock, tls=args.tls,
        compaction_min_entries=args.compaction_entries,
        key_store_tokens=tuple(args.key_store_token), api_workers=args.api_workers))


def _cmd_init(args: argparse.Namespace) -> int:
    from kmsd import bootstrap

    cfg = config_module.load(args.config)
    partition = _open_partition(args.config)
    try:
        # Fixed credentials come through the environment, never the command line.
        access_key_id, secret = bootstrap.init(
            partition, cfg.data_dir, os.environ.get(INIT_ACCESS_KEY_ENV),
            os.environ.get(INIT_SECRET_ENV))
        print(json.dumps({"account_id": cfg.account_id,
                          "principal_arn": f"arn:aws:iam::{cfg.account_id}:root",
                          "access_key_id": access_key_id, "secret_access_key": secret}))
    finally:
        partition.close()
    return 0


def _cmd_join(args: argparse.Namespace) -> int:
    from kmsd.join import join

    cfg = config_module.load(args.config)
    partition = _open_partition(args.config)
    try:
        print(json.dumps(join(cfg, partition, args.token, args.via, args.ca_bundle)))
    finally:
        partition.close()
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    """Stage a saved state snapshot: the node loads it through Raft when it next serves."""
    import msgpack

    from kmsd.node import RESTORE_FILE

    cfg = config_module.load(args.config)
    with open(args.file, "rb") as handle:
        data = handle.read()
    try:
        raw = msgpack.unpackb(data)
        keys = len(raw["keys"])
    except (ValueError, KeyError, TypeError):
        print(f"kmsd: {args.file} is not a kmsd state snapshot", file=sys.stderr)
        return 2
    os.makedirs(cfg.data_dir, exist_ok=True)
    target = os.path.join(cfg.data_dir, RESTORE_FILE)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    print(json.dumps({"staged": target, "keys": keys}))
    return 0


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    """Offline: verify a directory of audit segments (a node's, or a copy of one)."""
    import dataclasses

    from kmsd.audit.chain import ChainHead
    from kmsd.audit.segments import verify_directory

    expected = (ChainHead(args.expected_seq, args.expected_hash)
                if args.expected_seq is not None and args.expected_hash else None)
    result = verify_directory(args.dir, expected_head=expected)
    checked = None
    if args.public_key and result.ok:
        import base64

        from kmsd.audit.digests import check_digests
        from kmsd.audit.segments import read_records

        checked = check_digests(read_records(args.dir), base64.b64decode(args.public_key))
    ok = result.ok and (checked is None or checked.ok)
    print(json.dumps({"ok": ok, "records": result.records,
                      "digests": dataclasses.asdict(checked) if checked else None,
                      "head": dataclasses.asdict(result.head),
                      "error": dataclasses.asdict(result.error) if result.error else None,
                      "torn": dataclasses.asdict(result.torn) if result.torn else None}))
    return 0 if ok else 1


def _cmd_hsm(args: argparse.Namespace) -> int:
    from kmsd.hsm import domain_clone

    partition = _open_partition(args.config)
    try:
        if args.hsm_command == "init-domain-key":
            partition.create_domain_key()
            print(json.dumps({"domain_key_check": partition.domain_key_check_value()}))
        elif args.hsm_command == "check-value":
            print(json.dumps({"domain_key_check": partition.domain_key_check_value()}))
        elif args.hsm_command == "transport-key":
            print(json.dumps({"point": domain_clone.make_transport_key(partition).hex()}))
        elif args.hsm_command == "wrap-domain-key":
            point, wrapped, _ = domain_clone.wrap_domain_key_for(partition,
                                                                 bytes.fromhex(args.to))
            print(json.dumps({"point": point.hex(), "wrapped": wrapped.hex(),
                              "domain_key_check": partition.domain_key_check_value()}))
        elif args.hsm_command == "accept-domain-key":
            domain_clone.accept_domain_key(partition, bytes.fromhex(args.donor_point),
                                           bytes.fromhex(args.wrapped))
            print(json.dumps({"domain_key_check": partition.domain_key_check_value()}))
    finally:
        partition.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kmsd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one node")
    serve.add_argument("--config", required=True)
    serve.set_defaults(func=_cmd_serve)

    worker = sub.add_parser("api-worker", help="(started by kmsd serve) one API worker process")
    worker.add_argument("--config", required=True)
    worker.add_argument("--fd", type=int, required=True)
    worker.add_argument("--index", type=int, required=True)
    worker.set_defaults(func=_cmd_api_worker)

    init = sub.add_parser("init", help="create the domain key (if absent) and a root access key;"
                                       " prints the access key once")
    init.add_argument("--config", required=True)
    init.set_defaults(func=_cmd_init)

    join = sub.add_parser("join", help="join a running cluster (then start kmsd serve)")
    join.add_argument("--config", required=True)
    join.add_argument("--token", required=True, help="from kmsctl cluster join-token")
    join.add_argument("--via", required=True, help="a member's admin endpoint")
    join.add_argument("--ca-bundle", default=None, help="CA to verify the member's HTTPS")
    join.set_defaults(func=_cmd_join)

    restore = sub.add_parser("restore", help="stage a snapshot from kmsctl snapshot save; the "
                                             "node loads it when it serves (empty cluster)")
    restore.add_argument("file")
    restore.add_argument("--config", required=True)
    restore.set_defaults(func=_cmd_restore)

    dev = sub.add_parser("dev", help="run a local cluster with SoftHSM2 tokens")
    dev.add_argument("--nodes", type=int, default=3)
    dev.add_argument("--data-dir", default=None,
                     help="keep the cluster here (reused on restart); default: a temporary folder")
    dev.add_argument("--port", type=int, default=7700, help="base port")
    dev.add_argument("--account-id", default="111122223333")
    dev.add_argument("--region", default="us-east-1", help="a region or a comma-separated list")
    dev.add_argument("--access-key-id", default=None)
    dev.add_argument("--secret-access-key", default=None)
    dev.add_argument("--scheduler-interval", type=float, default=1.0,
                     help="seconds between the leader's deletion/rotation checks")
    dev.add_argument("--compaction-entries", type=int, default=2000,
                     help="snapshot the state and compact the Raft journal every N entries")
    dev.add_argument("--key-store-token", action="append", default=[], metavar="LABEL",
                     help="provision a custom key store token with this label (its "
                          "CloudHsmClusterId, e.g. cluster-kmsdstore1a) on every node")
    dev.add_argument("--api-workers", type=int, default=0, metavar="N",
                     help="API worker processes per node besides its primary, sharing its "
                          "API port")
    dev.add_argument("--tls", action="store_true",
                     help="HTTPS on every port with a private CA (its path: ca_bundle)")
    dev.add_argument("--test-clock", action="store_true",
                     help="tests only: proposer clocks read an offset from node-i/clock-offset")
    dev.set_defaults(func=_cmd_dev)

    audit = sub.add_parser("audit-verify", help="verify audit segment files offline")
    audit.add_argument("--dir", required=True)
    audit.add_argument("--expected-seq", type=int, default=None)
    audit.add_argument("--expected-hash", default=None)
    audit.add_argument("--public-key", default=None,
                       help="the digest signing key (base64 DER, from kmsctl audit public-key):"
                            " also check every signed digest")
    audit.set_defaults(func=_cmd_audit_verify)

    hsm = sub.add_parser("hsm", help="prepare a node's HSM token")
    hsm_sub = hsm.add_subparsers(dest="hsm_command", required=True)
    for name, text in (("init-domain-key", "create the cluster's first domain key"),
                       ("check-value", "print the domain key's check value"),
                       ("transport-key", "make a transport key pair to receive the domain key")):
        cmd = hsm_sub.add_parser(name, help=text)
        cmd.add_argument("--config", required=True)
    wrap = hsm_sub.add_parser("wrap-domain-key", help="wrap the domain key for a transport key")
    wrap.add_argument("--config", required=True)
    wrap.add_argument("--to", required=True, help="the recipient's transport public point (hex)")
    accept = hsm_sub.add_parser("accept-domain-key", help="unwrap a domain key sent to us")
    accept.add_argument("--config", required=True)
    accept.add_argument("--donor-point", required=True)
    accept.add_argument("--wrapped", required=True)
    hsm.set_defaults(func=_cmd_hsm)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except config_module.ConfigError as exc:
        print(f"kmsd: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # an HSM refusal at start-up: say why, without a traceback
        from kmsd.hsm.partition import HsmError

        if isinstance(exc, HsmError):
            print(f"kmsd: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
