"""A dependency-free client for systemd's service notification protocol (sd_notify(3)).

Under `Type=notify` systemd passes the path of a datagram socket in
`$NOTIFY_SOCKET`; the service sends newline-separated `KEY=VALUE` assignments
to it: `READY=1` once it is up, `STATUS=...` as free text for `systemctl
status`, `STOPPING=1` when shutdown begins, `WATCHDOG=1` as a keep-alive when
the unit sets `WatchdogSec=`. A socket path starting with '@' names a socket
in Linux's abstract namespace. Without `$NOTIFY_SOCKET` (a terminal, `kmsd
dev`, the tests) every call is a no-op that returns False.

Send READY=1 when the process has opened its token, started Raft and is
listening — not when the cluster has a quorum: a node started alone (the first
machine of a cluster to boot) must not be killed by `TimeoutStartSec=` while
it waits for its peers. Quorum and domain-key state belong in STATUS= and
`/readyz`.

What this module must never do: carry a secret. STATUS= text ends up in the
journal and in `systemctl status` for anyone to read.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


class SdNotifyError(OSError):
    """$NOTIFY_SOCKET is malformed, or the datagram could not be delivered."""


def _address(value: str) -> bytes:
    if value.startswith("@"):
        # Abstract namespace: a leading NUL instead of the '@', no file on disk.
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    raise SdNotifyError(f"{NOTIFY_SOCKET_ENV} must be an absolute path or start with '@', "
                        f"got {value!r}")


def _check(assignment: str) -> str:
    key, sep, _ = assignment.partition("=")
    if not sep or not key or "\n" in assignment:
        # A newline would let free text (a STATUS= line) smuggle in READY=1 or MAINPID=.
        raise ValueError(f"not a single KEY=VALUE assignment: {assignment!r}")
    return assignment


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one datagram with the given `KEY=VALUE` assignments.

    Returns False when `$NOTIFY_SOCKET` is unset or empty (not under systemd),
    True when the datagram was sent. Raises SdNotifyError when the variable is
    malformed or the send fails; callers other than start-up should log that
    and go on rather than stop serving.
    """
    if not assignments:
        raise ValueError("nothing to notify")
    payload = "\n".join(_check(a) for a in assignments).encode("utf-8")
    target = (os.environ if environ is None else environ).get(NOTIFY_SOCKET_ENV, "")
    if not target:
        return False
    address = _address(target)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, address)
    except OSError as exc:
        raise SdNotifyError(exc.errno, f"cannot notify systemd at {target!r}: "
                                       f"{exc.strerror}") from exc
    return True


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def ready(status: str | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """READY=1, optionally with a STATUS= line in the same datagram."""
    fields = ["READY=1"]
    if status is not None:
        fields.append(f"STATUS={_one_line(status)}")
    return notify(*fields, environ=environ)


def status(text: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """STATUS=<text>, shown by `systemctl status`. Newlines become spaces."""
    return notify(f"STATUS={_one_line(text)}", environ=environ)


def stopping(status: str | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """STOPPING=1: shutdown has begun (systemd then waits up to TimeoutStopSec=)."""
    fields = ["STOPPING=1"]
    if status is not None:
        fields.append(f"STATUS={_one_line(status)}")
    return notify(*fields, environ=environ)


def watchdog(*, environ: Mapping[str, str] | None = None) -> bool:
    """WATCHDOG=1: the keep-alive systemd expects every WatchdogSec= when it is set."""
    return notify("WATCHDOG=1", environ=environ)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between required WATCHDOG=1 pings, or None when no watchdog is armed for us.

    systemd sets `$WATCHDOG_USEC`, and `$WATCHDOG_PID` naming the process it
    watches; a child that inherited the variables is not that process. Ping at
    half the interval, as sd_watchdog_enabled(3) advises.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000
