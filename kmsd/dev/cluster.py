"""`kmsd dev`: a local N-node cluster on 127.0.0.1 with one SoftHSM2 token per node.

Layout under the data dir:

    node-1/softhsm2.conf  node-1/tokens/  node-1/pin  node-1/raft.secret  node-1/node.toml
    node-1/data/ (Raft journal and snapshot)  node-1/node.log
    ...

On first start it initialises every token, creates the domain key in node 1's
token and clones it into every other token by the ECDH transport-key exchange
(HSM to HSM: the host sees public points and a wrapped blob). PINs and the Raft
secret are files readable by the owner only. Dev credentials reach node 1
through its environment and are stored in the cluster sealed under the domain
key; they are printed once, in the JSON line on stdout.

`--key-store-token LABEL` also provisions a custom key store's token on every node
(node-i/tokens, label LABEL, one PIN in node-i/key-store-LABEL.pin, one store key made
in node 1's and cloned like the domain key); the summary prints the PIN as that
store's KeyStorePassword.

Ports for node i (1-based): API base+i-1, admin base+100+i-1, Raft base+200+i-1.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import ssl
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace

from kmsd import tls
from kmsd.cli import INIT_ACCESS_KEY_ENV, INIT_SECRET_ENV
from kmsd.hsm.partition import softhsm_module_path

READY_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class DevClusterOptions:
    nodes: int = 3
    data_dir: str | None = None
    base_port: int = 7700
    account_id: str = "111122223333"
    regions: tuple[str, ...] = ("us-east-1",)
    access_key_id: str | None = None
    secret_access_key: str | None = None
    scheduler_interval: float = 1.0
    # Test-only: each node's proposer clock reads an offset from node-i/clock-offset.
    test_clock: bool = False
    # HTTPS on every port, with certificates from a private CA made in the data dir.
    tls: bool = False
    compaction_min_entries: int = 2000
    # Labels of custom key store tokens to provision on every node (each with the same store
    # key and the same PIN, printed in the summary as the KeyStorePassword).
    key_store_tokens: tuple[str, ...] = ()
    # API worker processes per node besides its primary (kmsd.api_workers).
    api_workers: int = 0


@dataclass
class DevNode:
    index: int
    root: str
    base_port: int
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def node_id(self) -> str:
        return f"node-{self.index}"

    @property
    def api_port(self) -> int:
        return self.base_port + self.index - 1

    @property
    def admin_port(self) -> int:
        return self.base_port + 100 + self.index - 1

    @property
    def raft_address(self) -> str:
        return f"127.0.0.1:{self.base_port + 200 + self.index - 1}"

    tls: bool = False

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.api_port}"

    @property
    def admin_endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.admin_port}"

    @property
    def config_path(self) -> str:
        return os.path.join(self.root, "node.toml")

    @property
    def clock_offset_path(self) -> str:
        return os.path.join(self.root, "clock-offset")

    @property
    def token_label(self) -> str:
        return f"kmsd-{self.node_id}"


def _write_private(path: str, content: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)


def _random_text(length: int) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def write_node_files(node: DevNode, peers: list[DevNode], options: DevClusterOptions,
                     raft_secret: str) -> None:
    os.makedirs(os.path.join(node.root, "tokens"), exist_ok=True)
    os.makedirs(os.path.join(node.root, "data"), exist_ok=True)
    with open(os.path.join(node.root, "softhsm2.conf"), "w") as handle:
        handle.write(f"directories.tokendir = {os.path.join(node.root, 'tokens')}\n"
                     "objectstore.backend = file\nlog.level = ERROR\n")
    _write_private(os.path.join(node.root, "raft.secret"), raft_secret)
    other = [p.raft_address for p in peers if p.index != node.index]
    tls_lines = ""
    if options.tls:
        ca = os.path.join(os.path.dirname(node.root), "ca", "ca.pem")
        tls_lines = (f'tls_certificate = "{os.path.join(node.root, "tls.pem")}"\n'
                     f'tls_key = "{os.path.join(node.root, "tls-key.pem")}"\n'
                     f'tls_ca = "{ca}"\n')
    with open(node.config_path, "w") as handle:
        handle.write(f"""[node]
id = "{node.node_id}"
az = "az-{node.index}"
data_dir = "{os.path.join(node.root, 'data')}"
scheduler_interval_seconds = {options.scheduler_interval}

[api]
listen = "127.0.0.1:{node.api_port}"
admin_listen = "127.0.0.1:{node.admin_port}"
workers = {options.api_workers}
{tls_lines}
[raft]
address = "{node.raft_address}"
peers = {_toml_list(other)}
password_file = "{os.path.join(node.root, 'raft.secret')}"
compaction_min_entries = {options.compaction_min_entries}

[cluster]
regions = {_toml_list(list(options.regions))}
account_id = "{options.account_id}"

[hsm]
module = "{softhsm_module_path()}"
token_label = "{node.token_label}"
pin_file = "{os.path.join(node.root, 'pin')}"
softhsm2_conf = "{os.path.join(node.root, 'softhsm2.conf')}"
""")
        if options.test_clock:
            handle.write(f'\n[testing]\nclock_offset_file = "{node.clock_offset_path}"\n')


def _kmsd(*args: str, env: dict[str, str] | None = None) -> dict:
    result = subprocess.run([sys.executable, "-m", "kmsd.cli", *args], capture_output=True,
                            text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"kmsd {args[0]} {args[1]} failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout)


def init_token(node: DevNode) -> None:
    pin = _random_text(16)
    _write_private(os.path.join(node.root, "pin"), pin)
    env = {**os.environ, "SOFTHSM2_CONF": os.path.join(node.root, "softhsm2.conf")}
    # The SO PIN is only needed to initialise the token; it is not kept.
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", node.token_label,
                    "--so-pin", _random_text(16), "--pin", pin],
                   check=True, capture_output=True, env=env)


def clone_domain_key(donor: DevNode, recipient: DevNode) -> None:
    _clone_key(donor.config_path, recipient.config_path, recipient.node_id)


def _clone_key(donor_config: str, recipient_config: str, recipient: str) -> None:
    request = _kmsd("hsm", "transport-key", "--config", recipient_config)
    sent = _kmsd("hsm", "wrap-domain-key", "--config", donor_config, "--to", request["point"])
    accepted = _kmsd("hsm", "accept-domain-key", "--config", recipient_config,
                     "--donor-point", sent["point"], "--wrapped", sent["wrapped"])
    if accepted["domain_key_check"] != sent["domain_key_check"]:
        raise RuntimeError(f"key clone into {recipient} does not match")


def key_store_pin_path(node: DevNode, label: str) -> str:
    return os.path.join(node.root, f"key-store-{label}.pin")


def _key_store_config(node: DevNode, label: str) -> str:
    """node.toml with the store's token in place of the node's: what `kmsd hsm` needs to
    make and clone the store key in that token."""
    path = os.path.join(node.root, f"key-store-{label}.toml")
    with open(node.config_path) as handle:
        text = handle.read()
    text = text.replace(f'token_label = "{node.token_label}"', f'token_label = "{label}"')
    text = text.replace(f'pin_file = "{os.path.join(node.root, "pin")}"',
                        f'pin_file = "{key_store_pin_path(node, label)}"')
    with open(path, "w") as handle:
        handle.write(text)
    return path


def provision_key_store_token(nodes: list[DevNode], label: str) -> None:
    """A custom key store's token on every node: same label, same PIN, same store key --
    one PKCS#11 token per node, as a CloudHSM cluster has one HSM per AZ."""
    pin = _random_text(16)
    for node in nodes:
        _write_private(key_store_pin_path(node, label), pin)
        env = {**os.environ, "SOFTHSM2_CONF": os.path.join(node.root, "softhsm2.conf")}
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                        "--so-pin", _random_text(16), "--pin", pin],
                       check=True, capture_output=True, env=env)
    configs = [_key_store_config(node, label) for node in nodes]
    _kmsd("hsm", "init-domain-key", "--config", configs[0])
    for node, config in zip(nodes[1:], configs[1:], strict=True):
        _clone_key(configs[0], config, f"{label} on {node.node_id}")


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read().strip()


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0, context=context) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class DevCluster:
    def __init__(self, options: DevClusterOptions) -> None:
        self.options = options
        self._temporary = options.data_dir is None
        self.root = options.data_dir or tempfile.mkdtemp(prefix="kmsd-dev-")
        os.makedirs(self.root, exist_ok=True)
        # A cluster keeps its ports: Raft snapshots record the members' addresses, so a
        # restarted cluster on other ports could not find itself.
        layout_path = os.path.join(self.root, "dev-cluster.json")
        if os.path.exists(layout_path):
            with open(layout_path) as handle:
                layout = json.load(handle)
            if layout["base_port"] != options.base_port or layout["nodes"] != options.nodes:
                print(f"kmsd dev: {self.root} holds a {layout['nodes']}-node cluster on base "
                      f"port {layout['base_port']}; using that", file=sys.stderr)
            options = replace(options, base_port=layout["base_port"], nodes=layout["nodes"])
            self.options = options
        else:
            with open(layout_path, "w") as handle:
                json.dump({"base_port": options.base_port, "nodes": options.nodes}, handle)
        self.nodes = [DevNode(i, os.path.join(self.root, f"node-{i}"), options.base_port,
                              tls=options.tls)
                      for i in range(1, options.nodes + 1)]
        self.ca = tls.make_ca(os.path.join(self.root, "ca")) if options.tls else None
        self.ssl_context = (ssl.create_default_context(cafile=self.ca.certificate)
                            if self.ca else None)
        self.access_key_id = ""
        self.secret_access_key = ""

    def prepare(self) -> None:
        fresh = not all(os.path.exists(os.path.join(n.root, "pin")) for n in self.nodes)
        raft_secret_path = os.path.join(self.nodes[0].root, "raft.secret")
        if fresh:
            raft_secret = secrets.token_urlsafe(32)
        else:
            with open(raft_secret_path) as handle:
                raft_secret = handle.read().strip()
        for node in self.nodes:
            write_node_files(node, self.nodes, self.options, raft_secret)
            if self.ca is not None and not os.path.exists(os.path.join(node.root, "tls.pem")):
                tls.make_node_certificate(self.ca, node.root, node.node_id)
        if fresh:
            for node in self.nodes:
                init_token(node)
            _kmsd("hsm", "init-domain-key", "--config", self.nodes[0].config_path)
            for node in self.nodes[1:]:
                clone_domain_key(self.nodes[0], node)
            for label in self.options.key_store_tokens:
                provision_key_store_token(self.nodes, label)
        # Every start prints working credentials: fixed ones if given, else a new root key.
        env = dict(os.environ)
        if self.options.access_key_id and self.options.secret_access_key:
            env[INIT_ACCESS_KEY_ENV] = self.options.access_key_id
            env[INIT_SECRET_ENV] = self.options.secret_access_key
        created = _kmsd("init", "--config", self.nodes[0].config_path, env=env)
        self.access_key_id = created["access_key_id"]
        self.secret_access_key = created["secret_access_key"]

    def start(self) -> None:
        for node in self.nodes:
            log = open(os.path.join(node.root, "node.log"), "ab")  # noqa: SIM115
            node.process = subprocess.Popen(
                [sys.executable, "-m", "kmsd.cli", "serve", "--config", node.config_path],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            log.close()

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self.nodes)
        while pending:
            if time.monotonic() > deadline:
                names = ", ".join(n.node_id for n in pending)
                raise RuntimeError(f"nodes not ready after {timeout:.0f}s: {names}")
            for node in list(pending):
                if node.process is not None and node.process.poll() is not None:
                    raise RuntimeError(f"{node.node_id} exited with {node.process.returncode};"
                                       f" see {os.path.join(node.root, 'node.log')}")
                if _http_ok(node.endpoint + "/readyz", self.ssl_context):
                    pending.remove(node)
            time.sleep(0.1)

    def wait_credentials(self, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Wait until every node accepts the printed credentials (their key has replicated)."""
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        credentials = Credentials(self.access_key_id, self.secret_access_key)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            url = node.admin_endpoint + "/v1/node/status"
            while True:
                request = AWSRequest(method="GET", url=url, data=b"")
                SigV4Auth(credentials, "kms", self.options.regions[0]).add_auth(request)
                http = urllib.request.Request(url, headers=dict(request.prepare().headers))
                try:
                    with urllib.request.urlopen(http, timeout=2,
                                                context=self.ssl_context) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{node.node_id} does not accept the dev credentials")
                time.sleep(0.1)

    def summary(self) -> dict:
        return {
            "region": self.options.regions[0],
            "regions": list(self.options.regions),
            "account_id": self.options.account_id,
            "endpoints": [n.endpoint for n in self.nodes],
            "admin_endpoints": [n.admin_endpoint for n in self.nodes],
            "pids": [n.process.pid if n.process else None for n in self.nodes],
            "configs": [n.config_path for n in self.nodes],
            "clock_offset_files": ([n.clock_offset_path for n in self.nodes]
                                   if self.options.test_clock else []),
            "data_dir": self.root,
            "ca_bundle": self.ca.certificate if self.ca else None,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            "key_store_tokens": {label: _read(key_store_pin_path(self.nodes[0], label))
                                 for label in self.options.key_store_tokens},
        }

    def stop(self) -> None:
        running = [n.process for n in self.nodes if n.process and n.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._temporary:
            shutil.rmtree(self.root, ignore_errors=True)


def run_dev_cluster(options: DevClusterOptions) -> int:
    cluster = DevCluster(options)
    stop_requested = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        cluster.prepare()
        cluster.start()
        cluster.wait_ready()
        cluster.wait_credentials()
        print(json.dumps(cluster.summary()), flush=True)
        while not stop_requested:
            time.sleep(0.2)
        return 0
    except RuntimeError as exc:
        print(f"kmsd dev: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
