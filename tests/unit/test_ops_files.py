"""ops/: the systemd unit and its companions, the example configs, the Prometheus rules and the
Grafana dashboard.

Real tools check them where this machine has them (scripts/setup.sh brings them):
`systemd-analyze verify` and `security --offline`, `systemd-sysusers` and
`systemd-tmpfiles --root`, promtool (`check config`, `check rules`, `test rules`, and
`tsdb create-blocks-from` to backfill synthetic data) and a Prometheus server that evaluates
every dashboard query against that data. Without a tool its test skips, naming it; the
structural checks below run everywhere. Grafana is not in Debian, so the dashboard is never
loaded into a Grafana here: its JSON, ids, layout and queries are checked instead.

The unit's seccomp hardening (SystemCallFilter=, MemoryDenyWriteExecute=,
RestrictAddressFamilies=) is reproduced with libseccomp from the unit's own directives, and
the HSM path of a node (SoftHSM2 token, domain key, ECDH domain-key clone), aiohttp over TCP
and the cryptography package run under it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsd import config

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
UNIT = OPS / "systemd" / "kmsd@.service"
SYSUSERS = OPS / "systemd" / "kmsd.sysusers.conf"
TMPFILES = OPS / "systemd" / "kmsd.tmpfiles.conf"
EXAMPLES = OPS / "examples"
PROMETHEUS_CONFIG = OPS / "prometheus" / "prometheus.yml"
ALERTS = OPS / "prometheus" / "kmsd-alerts.yml"
ALERT_TESTS = OPS / "prometheus" / "kmsd-alerts.test.yml"
DASHBOARD = OPS / "grafana" / "kmsd-dashboard.json"
NODES = ("node-a", "node-b", "node-c")

# The series kmsd's /metrics exports (the contract with kmsd's metrics module).
COUNTERS = {"kmsd_requests_total", "kmsd_hsm_errors_total", "kmsd_hsm_handle_cache_hits_total",
            "kmsd_hsm_handle_cache_misses_total", "kmsd_audit_commit_failures_total"}
HISTOGRAMS = {"kmsd_request_duration_seconds", "kmsd_hsm_call_duration_seconds",
              "kmsd_audit_batch_size", "kmsd_audit_commit_duration_seconds",
              "kmsd_gc_pause_seconds", "kmsd_event_loop_lag_seconds"}
GAUGES = {"kmsd_raft_is_leader", "kmsd_raft_has_leader", "kmsd_raft_term",
          "kmsd_raft_commit_index", "kmsd_raft_applied_index", "kmsd_raft_lag_entries",
          "kmsd_keys", "kmsd_tls_certificate_expiry_timestamp_seconds", "kmsd_node_info",
          "kmsd_gc_frozen_objects"}
SERIES = (COUNTERS | GAUGES | {f"{h}{suffix}" for h in HISTOGRAMS
                               for suffix in ("_bucket", "_sum", "_count")})
# Series Prometheus itself makes for every scrape target; alerts may use them.
SCRAPE_SERIES = {"up"}


def _tool(name: str) -> str | None:
    """A command on PATH, or in the virtualenv's bin (where setup.sh unpacks promtool)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else None


def _need(name: str) -> str:
    path = _tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/setup.sh installs it)")
    return path


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False,
                          **kwargs)


# -- systemd unit -------------------------------------------------------------


def _unit_directives(path: Path) -> dict[str, list[tuple[str, str]]]:
    """systemd's unit syntax: [Section], Key=Value, '#'/';' comments, repeatable keys."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"{path.name}:{number}: keep directives on one line"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key.strip()), \
            f"{path.name}:{number}: not Key=Value in a section: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def _values(sections: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in sections.get(section, []) if k == key]


def _one(sections: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    values = _values(sections, section, key)
    assert len(values) == 1, f"[{section}] {key}= appears {len(values)} times"
    return values[0]


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    return _unit_directives(UNIT)


def test_unit_sections(unit):
    assert set(unit) == {"Unit", "Service", "Install"}
    assert _one(unit, "Install", "WantedBy") == "multi-user.target"
    assert "network-online.target" in _one(unit, "Unit", "After")
    assert _one(unit, "Unit", "AssertPathExists") == "/etc/kmsd/%i.toml"


def test_unit_runs_one_node_per_config_with_readiness(unit):
    assert _one(unit, "Service", "Type") == "notify"
    assert _one(unit, "Service", "NotifyAccess") == "main"
    assert _one(unit, "Service", "ExecStart") == \
        "/usr/bin/env kmsd serve --config /etc/kmsd/%i.toml"


def test_unit_restart_policy(unit):
    assert _one(unit, "Service", "Restart") == "on-failure"
    assert _one(unit, "Service", "RestartSec")
    # Since systemd 230 the start limits belong to [Unit]; in [Service] they are ignored.
    assert _one(unit, "Unit", "StartLimitIntervalSec")
    assert int(_one(unit, "Unit", "StartLimitBurst")) >= 1
    assert _one(unit, "Service", "TimeoutStopSec")
    assert _one(unit, "Service", "TimeoutStartSec")


def test_unit_identity_and_state(unit):
    assert _one(unit, "Service", "User") == "kmsd"
    assert _one(unit, "Service", "Group") == "kmsd"
    assert _one(unit, "Service", "ReadWritePaths") == "/var/lib/kmsd/%i"
    assert _one(unit, "Service", "StateDirectory") == "kmsd/%i"
    assert _one(unit, "Service", "UMask") == "0077"


def test_unit_hardening(unit):
    expected = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "LimitCORE": "0", "CapabilityBoundingSet": "",
        "AmbientCapabilities": "", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "LockPersonality": "yes",
        "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes", "RestrictNamespaces": "yes",
        "SystemCallArchitectures": "native", "MemoryDenyWriteExecute": "yes",
        "MemorySwapMax": "0",
    }
    for key, value in expected.items():
        assert _one(unit, "Service", key) == value, key
    assert _values(unit, "Service", "SystemCallFilter") == ["@system-service",
                                                            "~@privileged @resources"]


def test_unit_secrets_come_from_credentials_the_examples_name(unit):
    loaded = dict(v.split(":", 1) for v in _values(unit, "Service", "LoadCredential"))
    assert loaded == {"pin": "/etc/kmsd/credentials/%i/pin",
                      "raft-password": "/etc/kmsd/credentials/%i/raft-password"}
    for node in NODES:
        cfg = config.load(str(EXAMPLES / f"{node}.toml"))
        assert cfg.pin.credential in loaded
        assert cfg.raft_password.credential in loaded
        assert cfg.pin.file is None and cfg.raft_password.file is None


def test_systemd_analyze_verify(tmp_path):
    analyze = _need("systemd-analyze")
    # verify needs the template under its own name to instantiate kmsd@node-a.service.
    shutil.copy(UNIT, tmp_path / UNIT.name)
    result = _run(analyze, "verify", "--man=no", str(tmp_path / "kmsd@node-a.service"))
    # Unknown or misspelt directives are only warnings (exit 0): any output fails the test.
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), \
        result.stdout + result.stderr


def test_systemd_analyze_verify_would_catch_a_typo(tmp_path):
    """The verify test above is only as good as its reading of systemd-analyze's output."""
    analyze = _need("systemd-analyze")
    broken = UNIT.read_text().replace("ProtectHome=yes", "ProtectHom=yes")
    (tmp_path / UNIT.name).write_text(broken)
    result = _run(analyze, "verify", "--man=no", str(tmp_path / "kmsd@node-a.service"))
    assert "ProtectHom" in result.stderr


def test_systemd_analyze_security_exposure(tmp_path):
    analyze = _need("systemd-analyze")
    shutil.copy(UNIT, tmp_path / UNIT.name)
    # --threshold is the exposure level times ten: fail above 2.0 ("OK" is below 4.0).
    result = _run(analyze, "security", "--offline=yes", "--threshold=20", "--no-pager",
                  str(tmp_path / "kmsd@node-a.service"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_sysusers_and_tmpfiles(tmp_path):
    sysusers = _need("systemd-sysusers")
    root = tmp_path / "root"
    for directory in ("usr/lib/sysusers.d", "usr/lib/tmpfiles.d", "etc", "var/lib"):
        (root / directory).mkdir(parents=True)
    shutil.copy(SYSUSERS, root / "usr/lib/sysusers.d/kmsd.conf")
    shutil.copy(TMPFILES, root / "usr/lib/tmpfiles.d/kmsd.conf")
    result = _run(sysusers, f"--root={root}")
    assert result.returncode == 0, result.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in
              (root / "etc/passwd").read_text().splitlines()}
    assert passwd["kmsd"][5:] == ["/var/lib/kmsd", "/usr/sbin/nologin"]
    assert int(passwd["kmsd"][2]) < 1000  # a system user
    assert "kmsd" in {line.split(":")[0] for line in (root / "etc/group").read_text().splitlines()}
    if os.geteuid() != 0:
        return  # systemd-tmpfiles --create must chown, which needs root
    tmpfiles = _need("systemd-tmpfiles")
    result = _run(tmpfiles, f"--root={root}", "--create")
    assert result.returncode == 0, result.stderr
    uid, gid = int(passwd["kmsd"][2]), int(passwd["kmsd"][3])
    modes = {p: ((root / p).stat().st_mode & 0o777, (root / p).stat().st_uid,
                 (root / p).stat().st_gid)
             for p in ("etc/kmsd", "etc/kmsd/credentials", "var/lib/kmsd")}
    assert modes == {"etc/kmsd": (0o750, 0, gid), "etc/kmsd/credentials": (0o700, 0, 0),
                     "var/lib/kmsd": (0o750, uid, gid)}


# -- the unit's seccomp filters, reproduced -------------------------------------

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_EQ, _SCMP_CMP_GT, _SCMP_CMP_MASKED_EQ = 4, 6, 7
_PROT_WRITE, _PROT_EXEC, _SHM_EXEC = 0x2, 0x4, 0o100000


def _scmp_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ScmpArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _syscall_groups(analyze: str) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in _run(analyze, "syscall-filter").stdout.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif not line.startswith("    ") or current is None:
            current = None
        elif not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def _expand(groups: dict[str, list[str]], entries: list[str]) -> set[str]:
    names: set[str] = set()
    for entry in entries:
        names |= _expand(groups, groups[entry]) if entry.startswith("@") else {entry}
    return names


class UnitSeccomp:
    """The unit's SystemCallFilter=, MemoryDenyWriteExecute= and RestrictAddressFamilies=, as
    libseccomp filters loaded in the order systemd loads them (the call filter last)."""

    def __init__(self, unit: dict[str, list[tuple[str, str]]], analyze: str) -> None:
        self.lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_init.argtypes = [ctypes.c_uint32]
        self.lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
            ctypes.POINTER(_ScmpArg)]
        self.lib.seccomp_load.argtypes = [ctypes.c_void_p]
        self.lib.seccomp_release.argtypes = [ctypes.c_void_p]
        self.lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        groups = _syscall_groups(analyze)
        allowed: set[str] = set()
        for value in _values(unit, "Service", "SystemCallFilter"):
            if value.startswith("~"):
                allowed -= _expand(groups, value[1:].split())
            else:
                allowed |= _expand(groups, value.split())
        # systemd always lets these through (systemd.exec(5)).
        allowed |= {"execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn"}
        self.allowed = self._numbers(allowed)
        assert len(self.allowed) > 200, f"parsed only {len(self.allowed)} allowed syscalls"
        self.error = getattr(errno, _one(unit, "Service", "SystemCallErrorNumber"))
        self.mdwe = _one(unit, "Service", "MemoryDenyWriteExecute") == "yes"
        self.families = {getattr(socket, f)
                         for f in _one(unit, "Service", "RestrictAddressFamilies").split()}
        self.mmap = self._numbers({"mmap", "mmap2"})
        self.mprotect = self._numbers({"mprotect", "pkey_mprotect"})
        self.shmat = self._numbers({"shmat"})
        self.socket = self._numbers({"socket"})

    def _numbers(self, names: set[str]) -> list[int]:
        numbers = (self.lib.seccomp_syscall_resolve_name(n.encode()) for n in names)
        return sorted(n for n in numbers if n >= 0)  # others do not exist on this arch

    def _load(self, default: int, rules: list[tuple[int, int, list[_ScmpArg]]]) -> None:
        ctx = self.lib.seccomp_init(default)
        try:
            for action, number, args in rules:
                array = (_ScmpArg * max(1, len(args)))(*args)
                rc = self.lib.seccomp_rule_add_array(ctx, action, number, len(args), array)
                if rc < 0:
                    raise OSError(-rc, f"seccomp_rule_add({number})")
            rc = self.lib.seccomp_load(ctx)
            if rc < 0:
                raise OSError(-rc, "seccomp_load")
        finally:
            self.lib.seccomp_release(ctx)

    def apply(self) -> None:
        """Runs in the child between fork and exec (subprocess's preexec_fn)."""
        eperm = _scmp_errno(errno.EPERM)
        if self.mdwe:  # as systemd's seccomp_memory_deny_write_execute()
            wx = _PROT_WRITE | _PROT_EXEC
            self._load(_SCMP_ACT_ALLOW, [
                *((eperm, n, [_ScmpArg(2, _SCMP_CMP_MASKED_EQ, wx, wx)]) for n in self.mmap),
                *((eperm, n, [_ScmpArg(2, _SCMP_CMP_MASKED_EQ, _PROT_EXEC, _PROT_EXEC)])
                  for n in self.mprotect),
                *((eperm, n, [_ScmpArg(2, _SCMP_CMP_MASKED_EQ, _SHM_EXEC, _SHM_EXEC)])
                  for n in self.shmat)])
        refused = _scmp_errno(errno.EAFNOSUPPORT)
        last = max(socket.AddressFamily).value
        self._load(_SCMP_ACT_ALLOW, [
            *((refused, n, [_ScmpArg(0, _SCMP_CMP_EQ, family, 0)])
              for n in self.socket for family in range(last + 1) if family not in self.families),
            *((refused, n, [_ScmpArg(0, _SCMP_CMP_GT, last, 0)]) for n in self.socket)])
        self._load(_scmp_errno(self.error), [(_SCMP_ACT_ALLOW, n, []) for n in self.allowed])


@pytest.fixture(scope="module")
def unit_seccomp(unit) -> UnitSeccomp:
    analyze = _need("systemd-analyze")
    try:
        return UnitSeccomp(unit, analyze)
    except OSError:
        pytest.skip("libseccomp.so.2 is not installed")


_PROBE = textwrap.dedent("""
    import mmap, socket
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        print("wx-mapped")
    except OSError as exc:
        print("wx-refused", exc.errno)
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)
        print("netlink-opened")
    except OSError as exc:
        print("netlink-refused", exc.errno)
    import os
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 1)
        print("setpriority-done")
    except OSError as exc:
        print("setpriority-refused", exc.errno)
    socket.socket(socket.AF_INET6).close()
    print("inet6-opened")
""")


def test_the_reproduced_filters_bite(unit_seccomp):
    """The filters below are real: what the unit forbids fails, what it allows works."""
    result = subprocess.run([sys.executable, "-c", _PROBE], preexec_fn=unit_seccomp.apply,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:4] == [
        f"wx-refused {errno.EPERM}", f"netlink-refused {errno.EAFNOSUPPORT}",
        f"setpriority-refused {errno.EPERM}", "inet6-opened"]


_NODE_STACK = textwrap.dedent("""
    import asyncio, subprocess, sys
    from aiohttp import ClientSession, web
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from kmsd.dev.cluster import (DevClusterOptions, DevNode, clone_domain_key, init_token,
                                  write_node_files)

    root = sys.argv[1]
    nodes = [DevNode(i, f"{root}/node-{i}", 7700) for i in (1, 2)]
    for node in nodes:
        write_node_files(node, nodes, DevClusterOptions(), "raft-secret")
        init_token(node)
    subprocess.run([sys.executable, "-m", "kmsd.cli", "hsm", "init-domain-key",
                    "--config", nodes[0].config_path], check=True, capture_output=True)
    clone_domain_key(nodes[0], nodes[1])   # ECDH transport keys in both tokens

    key = AESGCM.generate_key(bit_length=256)
    assert AESGCM(key).decrypt(b"n" * 12, AESGCM(key).encrypt(b"n" * 12, b"x", b"a"), b"a")
    rsa.generate_private_key(65537, 2048).sign(b"m", padding.PKCS1v15(), hashes.SHA256())
    ec.generate_private_key(ec.SECP384R1()).sign(b"m", ec.ECDSA(hashes.SHA384()))

    async def http_round_trip():
        app = web.Application()
        app.router.add_get("/", lambda request: web.json_response({"ok": True}))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/") as response:
                assert (await response.json()) == {"ok": True}
        await runner.cleanup()

    asyncio.run(http_round_trip())
    print("node stack ok")
""")


def test_node_stack_runs_under_the_units_seccomp_filters(unit_seccomp, tmp_path):
    """SoftHSM2 through python-pkcs11, cryptography (Rust + cffi) and aiohttp: nothing of the
    node's stack needs writable-executable memory or a syscall the unit refuses."""
    if not shutil.which("softhsm2-util"):
        pytest.skip("softhsm2-util is not installed (scripts/setup.sh installs it)")
    result = subprocess.run([sys.executable, "-c", _NODE_STACK, str(tmp_path)],
                            preexec_fn=unit_seccomp.apply, capture_output=True, text=True,
                            timeout=240, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.strip().endswith("node stack ok")


# -- example configs ----------------------------------------------------------


@pytest.fixture
def example_credentials(tmp_path, monkeypatch) -> Path:
    (tmp_path / "pin").write_text("1234\n")
    (tmp_path / "raft-password").write_text("cluster-secret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    return tmp_path


def test_example_configs_form_one_cluster_across_three_azs(example_credentials):
    configs = [config.load(str(EXAMPLES / f"{node}.toml")) for node in NODES]
    assert [c.node_id for c in configs] == list(NODES)
    assert len({c.az for c in configs}) == 3
    addresses = {c.raft_address for c in configs}
    for cfg in configs:
        assert set(cfg.raft_peers) == addresses - {cfg.raft_address}
        assert cfg.regions == configs[0].regions and cfg.account_id == configs[0].account_id
        assert cfg.az.startswith(cfg.default_region)
        # The unit may write only /var/lib/kmsd/%i, %i being the config's file name.
        assert cfg.data_dir == f"/var/lib/kmsd/{cfg.node_id}"
        assert cfg.pin.read("HSM PIN") == "1234"
        assert cfg.raft_password.read("Raft password") == "cluster-secret"
        assert cfg.softhsm2_conf == f"/etc/kmsd/{cfg.node_id}.softhsm2.conf"
        softhsm = (EXAMPLES / f"{cfg.node_id}.softhsm2.conf").read_text()
        token_dir = re.search(r"^directories\.tokendir\s*=\s*(\S+)", softhsm, re.M)
        assert token_dir and token_dir.group(1).startswith(cfg.data_dir + "/")
    assert len({c.token_label for c in configs}) == 3
    assert len({c.public_url for c in configs}) == 3


def test_example_tls_lines_parse_once_uncommented(example_credentials, unit):
    loaded_tls = [v for v in _values(unit, "Service", "LoadCredential")
                            if v.startswith("tls-key:")]
    assert not loaded_tls  # HTTPS is opt-in: the unit loads no key by default
    assert "# LoadCredential=tls-key:/etc/kmsd/credentials/%i/tls.key" in UNIT.read_text()
    for node in NODES:
        text = (EXAMPLES / f"{node}.toml").read_text()
        enabled = re.sub(r"^# (tls_\w+ = )", r"\1", text, flags=re.M).replace("http://", "https://")
        cfg = config.parse(tomllib.loads(enabled))
        assert cfg.tls_certificate == f"/etc/kmsd/tls/{node}.pem"
        # systemd puts LoadCredential= copies in /run/credentials/<unit name>/.
        assert cfg.tls_key == f"/run/credentials/kmsd@{node}.service/tls-key"
        assert cfg.public_url.startswith("https://") and cfg.admin_url.startswith("https://")


def test_example_configs_carry_no_secret_values():
    for path in EXAMPLES.iterdir():
        text = path.read_text()
        for option in ("pin_file", "pin_env", "password_file", "password_env"):
            assert not re.search(rf"^\s*{option}\s*=", text, re.M), (path.name, option)


# -- PromQL -------------------------------------------------------------------

_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                 "or", "unless", "offset", "inf", "nan", "atan2"}


def promql_series(expr: str) -> set[str]:
    """The metric names an expression selects (not its functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        rest = text[match.end():].lstrip()
        if rest.startswith("(") or match.group().lower() in _PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def test_promql_series_extraction():
    assert promql_series('histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{x="y"}[5m])))'
                         ) == {"a_bucket"}
    assert promql_series("b * on (instance) group_left (node_id) c{az=~\"$az\"} - time()") == \
        {"b", "c"}
    assert promql_series("sum by (x) (rate(d[$__rate_interval])) > 14 * 86400") == {"d"}
    assert promql_series("e offset 5m and bool f") == {"e", "f"}


def _alert_exprs() -> dict[str, str]:
    """alert name -> expr, read from the layout kmsd-alerts.yml keeps (promtool checks YAML)."""
    alerts: dict[str, str] = {}
    lines = ALERTS.read_text().splitlines()
    name = None
    for index, line in enumerate(lines):
        if match := re.match(r"\s*- alert: (\w+)$", line):
            name = match.group(1)
        elif (match := re.match(r"(\s*)expr: (.*)$", line)) and name:
            if match.group(2) == "|-":
                indent = len(match.group(1))
                block = []
                for following in lines[index + 1:]:
                    if following.strip() and len(following) - len(following.lstrip()) <= indent:
                        break
                    block.append(following.strip())
                alerts[name] = " ".join(block).strip()
            else:
                alerts[name] = match.group(2)
            name = None
    return alerts


def test_alert_rules_cover_the_required_conditions():
    alerts = _alert_exprs()
    assert {"KmsdNoLeader", "KmsdNodeLagging", "KmsdAuditCommitSlow", "KmsdAuditCommitFailures",
            "KmsdHsmErrors", "KmsdCertificateExpiringSoon", "KmsdNodeDown",
            "KmsdMajorityOfVotersInOneAZ", "KmsdEventLoopStalls"} <= set(alerts)
    assert "kmsd_node_info" in promql_series(alerts["KmsdMajorityOfVotersInOneAZ"])
    assert "14 * 86400" in alerts["KmsdCertificateExpiringSoon"]
    assert "histogram_quantile(0.99" in alerts["KmsdAuditCommitSlow"]


def test_alert_rules_use_only_kmsd_series():
    for name, expr in _alert_exprs().items():
        used = promql_series(expr)
        assert used, name
        assert used <= SERIES | SCRAPE_SERIES, (name, used - SERIES - SCRAPE_SERIES)


def test_promtool_check_config_and_rules():
    promtool = _need("promtool")
    result = _run(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    result = _run(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alert_exprs())} rules found" in result.stdout


def test_promtool_alert_unit_tests():
    promtool = _need("promtool")
    result = _run(promtool, "test", "rules", str(ALERT_TESTS), cwd=ALERT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert tested == set(_alert_exprs())


def test_prometheus_config_scrapes_the_example_nodes():
    text = PROMETHEUS_CONFIG.read_text()
    targets = set(re.findall(r"^\s*- (\S+:\d+)$", text, re.M))
    expected = set()
    for node in NODES:
        cfg = config.parse(_toml(EXAMPLES / f"{node}.toml"))
        expected.add(cfg.public_url.split("://", 1)[1])
    assert targets == expected
    assert "job_name: kmsd" in text
    assert "- kmsd-alerts.yml" in text


def _toml(path: Path) -> dict:
    with open(path, "rb") as handle:
        return tomllib.load(handle)


# -- Grafana dashboard ----------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def _targets(dashboard: dict) -> Iterator[tuple[dict, dict]]:
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


def test_dashboard_is_importable_json(dashboard):
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard.get("id") is None  # an import gets its own id
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    assert "${DS_PROMETHEUS}" in DASHBOARD.read_text()


def test_dashboard_panel_ids_are_unique(dashboard):
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    assert all(isinstance(i, int) and i > 0 for i in ids)


def test_dashboard_layout_has_no_overlaps(dashboard):
    taken: set[tuple[int, int]] = set()
    for panel in _panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & taken, panel["title"]
        taken |= cells


def test_every_query_uses_the_prometheus_input(dashboard):
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_dashboard_queries_use_only_kmsd_series(dashboard):
    used: set[str] = set()
    for panel, target in _targets(dashboard):
        names = promql_series(target["expr"])
        assert names, (panel["title"], target["expr"])
        assert names <= SERIES, (panel["title"], names - SERIES)
        used |= names
    for variable in dashboard["templating"]["list"]:
        selector = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["query"]["query"])
        assert selector, variable["name"]
        assert promql_series(selector.group(1)) <= SERIES
    # Every exported series has a panel (a histogram through any of its series).
    shown = {name for name in SERIES if name in used}
    shown |= {h for h in HISTOGRAMS if any(n.startswith(h + "_") for n in used)}
    assert (COUNTERS | GAUGES | HISTOGRAMS) - shown == set()


def test_dashboard_has_the_required_panels(dashboard):
    titles = {p["title"] for p in _panels(dashboard)}
    assert {"Request rate by operation and outcome", "Request latency p50 / p99 by operation",
            "HSM call latency p50 / p99 by call", "HSM errors by call", "Handle cache hit ratio",
            "Raft role", "Raft term", "Commit and applied index", "Lag (entries)",
            "Audit batch size", "Audit commit latency p50 / p99", "Keys by state",
            "TLS certificate expires in"} <= titles


# -- a real Prometheus evaluates every dashboard query ---------------------------

_INSTANCES = {"kms-a.example.net:8443": ("node-a", "eu-west-1a"),
              "kms-b.example.net:8443": ("node-b", "eu-west-1b"),
              "kms-c.example.net:8443": ("node-c", "eu-west-1c")}
_STEP = 15
_SAMPLES = 121  # 30 minutes


def _openmetrics(end: int) -> str:
    """30 minutes of every kmsd series for three nodes, as an OpenMetrics backfill file."""
    start = end - _STEP * (_SAMPLES - 1)
    stamps = [start + i * _STEP for i in range(_SAMPLES)]
    families: list[str] = []

    def family(name: str, kind: str, series: list[tuple[str, dict[str, str], list[float]]]):
        families.append(f"# TYPE {name} {kind}")
        for sample_name, labels, values in series:
            text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            families.extend(f"{sample_name}{{{text}}} {value} {stamp}"
                            for value, stamp in zip(values, stamps, strict=True))

    def base(instance: str, **labels: str) -> dict[str, str]:
        return {"job": "kmsd", "instance": instance, **labels}

    ramp = [float(i) for i in range(_SAMPLES)]

    def histogram(name: str, bounds: tuple[float, ...], label_sets: list[dict[str, str]]):
        series = []
        for instance in _INSTANCES:
            for labels in label_sets:
                for n, bound in enumerate((*bounds, float("inf"))):
                    le = "+Inf" if bound == float("inf") else repr(bound)
                    share = min(1.0, (n + 1) / len(bounds))
                    series.append((f"{name}_bucket", base(instance, le=le, **labels),
                                   [10 * share * v for v in ramp]))
                series.append((f"{name}_count", base(instance, **labels), [10 * v for v in ramp]))
                series.append((f"{name}_sum", base(instance, **labels), [0.05 * v for v in ramp]))
        family(name, "histogram", series)

    def counter(name: str, label_sets: list[dict[str, str]], per_step: float):
        family(name.removesuffix("_total"), "counter",
               [(name, base(i, **labels), [per_step * v for v in ramp])
                for i in _INSTANCES for labels in label_sets])

    def gauge(name: str, values: dict[str, list[float]], labels=None):
        family(name, "gauge", [(name, base(i, **(labels(i) if labels else {})), values[i])
                               for i in _INSTANCES])

    operations = [{"operation": o, "outcome": r} for o in ("Decrypt", "GenerateDataKey")
                  for r in ("ok", "error")]
    counter("kmsd_requests_total", operations, 20)
    histogram("kmsd_request_duration_seconds", (0.001, 0.01, 0.1),
              [{"operation": "Decrypt"}, {"operation": "GenerateDataKey"}])
    histogram("kmsd_hsm_call_duration_seconds", (0.0001, 0.001, 0.01),
              [{"call": "unwrap"}, {"call": "decrypt"}])
    counter("kmsd_hsm_errors_total", [{"call": "unwrap"}], 0)  # a healthy cluster
    counter("kmsd_hsm_handle_cache_hits_total", [{}], 30)
    counter("kmsd_hsm_handle_cache_misses_total", [{}], 1)
    leader = next(iter(_INSTANCES))
    gauge("kmsd_raft_is_leader", {i: [float(i == leader)] * _SAMPLES for i in _INSTANCES})
    gauge("kmsd_raft_has_leader", {i: [1.0] * _SAMPLES for i in _INSTANCES})
    gauge("kmsd_raft_term", {i: [3.0] * _SAMPLES for i in _INSTANCES})
    gauge("kmsd_raft_commit_index", {i: [100 + 5 * v for v in ramp] for i in _INSTANCES})
    gauge("kmsd_raft_applied_index", {i: [99 + 5 * v for v in ramp] for i in _INSTANCES})
    gauge("kmsd_raft_lag_entries", {i: [1.0] * _SAMPLES for i in _INSTANCES})
    histogram("kmsd_audit_batch_size", (1.0, 10.0, 100.0), [{}])
    histogram("kmsd_audit_commit_duration_seconds", (0.001, 0.01, 0.1), [{}])
    counter("kmsd_audit_commit_failures_total", [{}], 0)
    family("kmsd_keys", "gauge", [("kmsd_keys", base(i, state=s), [n] * _SAMPLES)
                                  for i in _INSTANCES
                                  for s, n in (("Enabled", 40.0), ("Disabled", 2.0),
                                               ("PendingDeletion", 1.0))])
    gauge("kmsd_tls_certificate_expiry_timestamp_seconds",
          {i: [end + 30 * 86400.0] * _SAMPLES for i in _INSTANCES})
    histogram("kmsd_gc_pause_seconds", (0.001, 0.01, 0.1),
              [{"generation": g} for g in ("0", "1", "2")])
    gauge("kmsd_gc_frozen_objects", {i: [95_000.0] * _SAMPLES for i in _INSTANCES})
    histogram("kmsd_event_loop_lag_seconds", (0.001, 0.01, 0.4), [{}])
    gauge("kmsd_node_info", {i: [1.0] * _SAMPLES for i in _INSTANCES},
          labels=lambda i: {"node_id": _INSTANCES[i][0], "az": _INSTANCES[i][1],
                            "region": "eu-west-1"})
    return "\n".join(families) + "\n# EOF\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:  # a bad query is a 400 with a JSON error body
        return json.load(exc)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory) -> Iterator[tuple[str, int]]:
    promtool = _need("promtool")
    server = _need("prometheus")
    root = tmp_path_factory.mktemp("prometheus")
    end = int(time.time()) // _STEP * _STEP - 60
    (root / "series.om").write_text(_openmetrics(end))
    result = _run(promtool, "tsdb", "create-blocks-from", "openmetrics",
                  str(root / "series.om"), str(root / "data"))
    assert result.returncode == 0, result.stdout + result.stderr
    (root / "prometheus.yml").write_text("global:\n  scrape_interval: 15s\n")
    port = _free_port()
    log = open(root / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [server, f"--config.file={root / 'prometheus.yml'}",
         f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, (root / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", end
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _grafana_to_promql(expr: str) -> str:
    """Grafana's variables as the dashboard's defaults would expand them."""
    return (expr.replace("$__rate_interval", "1m").replace("$job", "kmsd")
            .replace("$instance", ".*"))


def test_prometheus_evaluates_every_dashboard_query(prometheus, dashboard):
    url, end = prometheus
    for panel, target in _targets(dashboard):
        query = _grafana_to_promql(target["expr"])
        answer = _get_json(f"{url}/api/v1/query?" + urllib.parse.urlencode(
            {"query": query, "time": end}))
        assert answer["status"] == "success", (panel["title"], query, answer.get("error"))
        values = [float(r["value"][1]) for r in answer["data"]["result"]]
        assert values, (panel["title"], "no data", query)
        assert not any(v != v for v in values), (panel["title"], "NaN", query)
    for variable in dashboard["templating"]["list"]:
        selector, label = re.fullmatch(r"label_values\((.*), (\w+)\)",
                                       variable["query"]["query"]).groups()
        answer = _get_json(f"{url}/api/v1/series?" + urllib.parse.urlencode(
            {"match[]": _grafana_to_promql(selector), "start": end - 600, "end": end}))
        assert answer["status"] == "success" and answer["data"], variable["name"]
        assert all(label in series for series in answer["data"])


def test_prometheus_evaluates_every_alert_expression(prometheus):
    """On a healthy synthetic cluster every rule parses and evaluates, and none is firing."""
    url, end = prometheus
    for name, expr in _alert_exprs().items():
        answer = _get_json(f"{url}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr, "time": end}))
        assert answer["status"] == "success", (name, answer.get("error"))
        assert answer["data"]["result"] == [], (name, answer["data"]["result"])
