"""A node's configuration, read from TOML.

Example:

    [node]
    id = "node-1"
    az = "az-a"
    data_dir = "/var/lib/kmsd"
    scheduler_interval_seconds = 10     # how often the leader checks deletions and rotations

    [api]
    listen = "127.0.0.1:7700"          # the AWS KMS API
    admin_listen = "127.0.0.1:7800"    # kmsctl's admin API
    public_url = "http://127.0.0.1:7700"   # optional; how peers and clients reach this node
    workers = 1                        # optional: API worker processes besides the primary
    tls_certificate = "/etc/kmsd/tls.pem"  # optional: serve HTTPS on both ports
    tls_key = "/etc/kmsd/tls-key.pem"
    tls_ca = "/etc/kmsd/ca.pem"            # optional: the CA of the members' certificates

    [raft]
    address = "127.0.0.1:7900"
    peers = ["127.0.0.1:7901", "127.0.0.1:7902"]
    password_file = "/etc/kmsd/raft.secret"   # or password_env, or password_credential

    [cluster]
    regions = ["us-east-1"]
    account_id = "111122223333"

    [hsm]
    module = "/usr/lib/softhsm/libsofthsm2.so"
    token_label = "kmsd-node-1"
    pin_file = "/etc/kmsd/pin"        # or pin_env = "KMSD_HSM_PIN", or pin_credential = "pin"
    softhsm2_conf = "/var/lib/kmsd/softhsm2.conf"   # optional, SoftHSM2 only

    [testing]            # never in production
    clock_offset_file = "/tmp/offset"   # seconds added to the proposer clock

Secrets (PIN, Raft password) are never written into this file: it names where
each comes from, exactly one of

- `*_file`: a file, readable by the kmsd user only (0600);
- `*_env`: an environment variable;
- `*_credential`: a systemd credential, read from
  `$CREDENTIALS_DIRECTORY/<name>`; the unit loads it with
  `LoadCredential=<name>:<path>` (ops/systemd/kmsd@.service), so the source file
  stays root-only and the service reads a private, read-only copy.

A secret that is empty after stripping whitespace is refused: an empty Raft
password would leave pysyncobj's pickle port unauthenticated.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass

from kmsd.hsm.partition import softhsm_module_path

_ACCOUNT_ID = re.compile(r"^\d{12}$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")


class ConfigError(ValueError):
    pass


CREDENTIALS_DIRECTORY_ENV = "CREDENTIALS_DIRECTORY"


@dataclass(frozen=True)
class SecretSource:
    """Where one secret comes from; exactly one field is set. Never holds the secret itself."""

    file: str | None = None
    env: str | None = None
    credential: str | None = None

    def read(self, what: str) -> str:
        if self.file:
            where = f"{what} file {self.file}"
            value = self._read_file(self.file, where)
        elif self.env:
            env_value = os.environ.get(self.env)
            if env_value is None:
                raise ConfigError(f"{what} environment variable {self.env} is not set")
            value = env_value  # as given: unlike a file, a variable has no trailing newline
            where = f"{what} environment variable {self.env}"
        elif self.credential:
            directory = os.environ.get(CREDENTIALS_DIRECTORY_ENV)
            if not directory:
                raise ConfigError(
                    f"{what} credential {self.credential!r} cannot be read: "
                    f"{CREDENTIALS_DIRECTORY_ENV} is not set (run under systemd with "
                    f"LoadCredential={self.credential}:<path>, or name a file instead)")
            path = os.path.join(directory, self.credential)
            where = f"{what} credential {self.credential!r} at {path}"
            value = self._read_file(path, where)
        else:
            raise ConfigError(f"no source configured for the {what}")
        if not value.strip():
            raise ConfigError(f"{where} is empty")
        return value

    @staticmethod
    def _read_file(path: str, where: str) -> str:
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {where}: {exc.strerror}") from None


def _secret_source(section: dict, section_name: str, prefix: str) -> SecretSource:
    """The one source `<prefix>_file`, `<prefix>_env` or `<prefix>_credential` names."""
    options = (f"{prefix}_file", f"{prefix}_env", f"{prefix}_credential")
    given = [o for o in options if section.get(o) is not None]
    if not given:
        raise ConfigError(f"{section_name} needs one of {', '.join(options)}")
    if len(given) > 1:
        raise ConfigError(f"{section_name}: set only one of {', '.join(options)} "
                          f"(found {', '.join(given)})")
    option = given[0]
    value = section[option]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{section_name}.{option} must be a non-empty string")
    if option.endswith("_credential") and ("/" in value or value in (".", "..")):
        # systemd's rule for credential names: one path component.
        raise ConfigError(f"{section_name}.{option} must be a credential name without '/', "
                          f"got {value!r}")
    return SecretSource(**{option.removeprefix(f"{prefix}_"): value})


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    az: str
    data_dir: str
    api_listen: str
    admin_listen: str
    public_url: str
    admin_url: str
    raft_address: str
    raft_peers: tuple[str, ...]
    raft_password: SecretSource
    regions: tuple[str, ...]
    account_id: str
    hsm_module: str
    token_label: str
    pin: SecretSource
    softhsm2_conf: str | None
    scheduler_interval_seconds: float = 10.0
    # Log compaction: snapshot once the journal holds this many entries (or this old).
    compaction_min_entries: int = 2000
    compaction_min_seconds: float = 60.0
    # Test-only: a file holding seconds to add to the proposer clock.
    clock_offset_file: str | None = None
    tls_certificate: str | None = None
    tls_key: str | None = None
    # The CA that signed the members' certificates (node-to-node calls verify with it).
    tls_ca: str | None = None
    # Hardware tokens without in-token RSA-OAEP-SHA256: decode OAEP on the host for imports.
    allow_host_oaep_decoding: bool = False
    # API worker processes beside the primary, sharing the API port (kmsd.api_workers).
    api_workers: int = 0

    @property
    def default_region(self) -> str:
        return self.regions[0]


def _split_host_port(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{what} must be host:port, got {value!r}")
    return host, int(port)


def load(path: str) -> NodeConfig:
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    try:
        return parse(raw)
    except KeyError as exc:
        raise ConfigError(f"config {path} lacks {exc.args[0]}") from None


def parse(raw: dict) -> NodeConfig:
    node, api, raft, cluster, hsm = (raw[s] for s in ("node", "api", "raft", "cluster", "hsm"))
    regions = tuple(cluster["regions"])
    if not regions or not all(isinstance(r, str) and _REGION.match(r) for r in regions):
        raise ConfigError(f"cluster.regions must be region names, got {regions!r}")
    account_id = str(cluster["account_id"])
    if not _ACCOUNT_ID.match(account_id):
        raise ConfigError("cluster.account_id must be 12 digits")
    host, port = _split_host_port(api["listen"], "api.listen")
    admin_host, admin_port = _split_host_port(api["admin_listen"], "api.admin_listen")
    _split_host_port(raft["address"], "raft.address")
    if bool(api.get("tls_certificate")) != bool(api.get("tls_key")):
        raise ConfigError("api.tls_certificate and api.tls_key go together")
    scheme = "https" if api.get("tls_certificate") else "http"
    return NodeConfig(
        node_id=str(node["id"]),
        az=str(node.get("az", "default")),
        data_dir=str(node["data_dir"]),
        api_listen=api["listen"],
        admin_listen=api["admin_listen"],
        public_url=api.get("public_url", f"{scheme}://{host}:{port}"),
        admin_url=api.get("admin_url", f"{scheme}://{admin_host}:{admin_port}"),
        raft_address=raft["address"],
        raft_peers=tuple(raft.get("peers", ())),
        raft_password=_secret_source(raft, "raft", "password"),
        regions=regions,
        account_id=account_id,
        hsm_module=hsm.get("module") or softhsm_module_path(),
        token_label=hsm["token_label"],
        pin=_secret_source(hsm, "hsm", "pin"),
        softhsm2_conf=hsm.get("softhsm2_conf"),
        allow_host_oaep_decoding=bool(hsm.get("allow_host_oaep_decoding", False)),
        scheduler_interval_seconds=float(node.get("scheduler_interval_seconds", 10.0)),
        compaction_min_entries=int(raft.get("compaction_min_entries", 2000)),
        compaction_min_seconds=float(raft.get("compaction_min_seconds", 60.0)),
        clock_offset_file=raw.get("testing", {}).get("clock_offset_file"),
        tls_certificate=api.get("tls_certificate"),
        tls_key=api.get("tls_key"),
        tls_ca=api.get("tls_ca"),
        api_workers=_api_workers(api.get("workers", 0)),
    )


def _api_workers(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 64:
        raise ConfigError(f"api.workers must be a whole number from 0 to 64, got {value!r}")
    return value
