"""kmsd.sd_notify against real AF_UNIX datagram sockets, as systemd's listener would be."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator

import pytest

from kmsd import sd_notify


@pytest.fixture
def listener(tmp_path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    try:
        yield sock, path
    finally:
        sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[tuple[socket.socket, str]]:
    name = f"kmsd-test-{os.getpid()}-{secrets.token_hex(8)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2.0)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def _received(sock: socket.socket) -> str:
    return sock.recv(4096).decode("utf-8")


def test_ready_reaches_a_socket_file(listener):
    sock, path = listener
    assert sd_notify.ready(environ={"NOTIFY_SOCKET": path}) is True
    assert _received(sock) == "READY=1"


def test_ready_with_status_is_one_datagram(listener):
    sock, path = listener
    assert sd_notify.ready("serving; leader node-b", environ={"NOTIFY_SOCKET": path})
    assert _received(sock) == "READY=1\nSTATUS=serving; leader node-b"


def test_each_message_kind(listener):
    sock, path = listener
    env = {"NOTIFY_SOCKET": path}
    assert sd_notify.status("waiting for a quorum", environ=env)
    assert _received(sock) == "STATUS=waiting for a quorum"
    assert sd_notify.stopping(environ=env)
    assert _received(sock) == "STOPPING=1"
    assert sd_notify.stopping("draining audit batches", environ=env)
    assert _received(sock) == "STOPPING=1\nSTATUS=draining audit batches"
    assert sd_notify.watchdog(environ=env)
    assert _received(sock) == "WATCHDOG=1"


def test_abstract_namespace_socket(abstract_listener):
    sock, address = abstract_listener
    assert sd_notify.ready(environ={"NOTIFY_SOCKET": address})
    assert _received(sock) == "READY=1"


def test_reads_the_process_environment_by_default(listener, monkeypatch):
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sd_notify.status("from os.environ")
    assert _received(sock) == "STATUS=from os.environ"


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}])
def test_no_op_without_notify_socket(env, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify.ready(environ=env) is False
    assert sd_notify.status("x", environ=env) is False
    assert sd_notify.stopping(environ=env) is False
    assert sd_notify.watchdog(environ=env) is False
    assert sd_notify.ready() is False


def test_status_newlines_cannot_inject_assignments(listener):
    sock, path = listener
    assert sd_notify.status("line one\nREADY=1\r\nMAINPID=1", environ={"NOTIFY_SOCKET": path})
    assert _received(sock) == "STATUS=line one READY=1 MAINPID=1"


@pytest.mark.parametrize("bad", ["READY", "=1", "STATUS=a\nREADY=1"])
def test_notify_rejects_malformed_assignments(bad):
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sd_notify.notify(bad, environ={})


def test_notify_needs_an_assignment():
    with pytest.raises(ValueError, match="nothing to notify"):
        sd_notify.notify(environ={"NOTIFY_SOCKET": "/nonexistent"})


def test_relative_socket_path_is_an_error():
    with pytest.raises(sd_notify.SdNotifyError, match="absolute path or start with '@'"):
        sd_notify.ready(environ={"NOTIFY_SOCKET": "relative/notify.sock"})


def test_missing_socket_is_an_error_naming_it(tmp_path):
    missing = str(tmp_path / "gone.sock")
    with pytest.raises(sd_notify.SdNotifyError, match="gone.sock") as caught:
        sd_notify.ready(environ={"NOTIFY_SOCKET": missing})
    assert caught.value.errno is not None
    assert isinstance(caught.value, OSError)


def test_watchdog_interval():
    pid = str(os.getpid())
    assert sd_notify.watchdog_interval({}) is None
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": pid}) == 2.5
    # Variables inherited from a parent that systemd watches do not arm a child's watchdog.
    other = str(os.getpid() + 1)
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "30000000",
                                        "WATCHDOG_PID": other}) is None
