"""Real SoftHSM2 tokens for the tests under tests/unit/hsm/, shared by the whole test session.

Why one token directory per session: SoftHSM2 reads SOFTHSM2_CONF once, in
C_Initialize, which python-pkcs11 runs at the process's first `pkcs11.lib()`
(kmsd.hsm.partition.load_library caches that object in `_LIBRARIES`). After
that, the token directory of the process is fixed, and tokens that
`softhsm2-util` adds to it are not seen (measured). So:

- `softhsm` (session scope) owns the token directory. If nothing in this
  process has loaded the library yet, it makes a directory under pytest's tmp
  dir, points SOFTHSM2_CONF at it (restored when the session ends), and
  creates tokens with `softhsm2-util --init-token`. If the library is already
  loaded (another test module got there first), it reuses that library and
  its conf, and creates tokens in-process instead: C_InitToken on the token's
  free slot (python-pkcs11 has no wrapper, so through ctypes on the same
  shared object) and C_InitPIN through an SO session.
- `softhsm.new_token(prefix)` gives a fresh token (label and user PIN) either way.
- `hsm_partition` and `second_hsm_partition` (session scope) are HsmPartitions
  on two tokens, each with its own domain key. Log-in state is per token and
  per process (FACTS.md §0.6), so there is one HsmPartition per token per
  session: other modules that need a partition should take these fixtures or
  make their own token with `softhsm.new_token`, never open these tokens again.

Any test in this process that loads the PKCS#11 library itself must do so
through kmsd.hsm.partition.load_library, after this fixture has run, or take
the `softhsm` fixture first.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pkcs11 import TokenFlag

from kmsd.hsm import partition as partition_module
from kmsd.hsm.partition import HsmPartition, load_library, softhsm_module_path

_CKR_OK = 0


@dataclass(frozen=True)
class SoftHsmToken:
    label: str
    pin: str


class SoftHsm:
    """The session's SoftHSM2 token directory and how to add tokens to it."""

    def __init__(self, module_path: str, conf_path: str, token_dir: str | None) -> None:
        self.module_path = module_path
        self.conf_path = conf_path
        self.token_dir = token_dir
        self._count = 0

    @property
    def library_loaded(self) -> bool:
        return self.module_path in partition_module._LIBRARIES

    def new_token(self, prefix: str = "unit") -> SoftHsmToken:
        self._count += 1
        token = SoftHsmToken(label=f"{prefix}-{os.getpid()}-{self._count}"[:32],
                          pin=secrets.token_hex(8))
        so_pin = secrets.token_hex(8)  # needed only to initialise the token; not kept
        if self.library_loaded:
            self._init_in_process(token, so_pin)
        else:
            env = {**os.environ, "SOFTHSM2_CONF": self.conf_path}
            subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", token.label,
                            "--so-pin", so_pin, "--pin", token.pin],
                           check=True, capture_output=True, env=env)
        return token

    def _init_in_process(self, token: SoftHsmToken, so_pin: str) -> None:
        lib = load_library(self.module_path)
        free = [slot for slot in lib.get_slots()
                if not slot.get_token().flags & TokenFlag.TOKEN_INITIALIZED]
        if not free:
            raise RuntimeError("SoftHSM2 offers no free slot to initialise a token in")
        cdll = ctypes.CDLL(self.module_path)  # the same, already initialised, module
        cdll.C_InitToken.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong,
                                     ctypes.c_char_p]
        cdll.C_InitToken.restype = ctypes.c_ulong
        so = so_pin.encode()
        label = token.label.encode().ljust(32, b" ")
        rv = cdll.C_InitToken(free[0].slot_id, so, len(so), label)
        if rv != _CKR_OK:
            raise RuntimeError(f"C_InitToken failed: CKR 0x{rv:x}")
        with lib.get_token(token_label=token.label).open(rw=True, so_pin=so_pin) as session:
            session.init_pin(token.pin)

    def open_partition(self, token: SoftHsmToken, with_domain_key: bool = True) -> HsmPartition:
        opened = HsmPartition(self.module_path, token.label, token.pin)
        if with_domain_key:
            opened.create_domain_key()
        return opened


def _conf_text(token_dir: Path) -> str:
    return (f"directories.tokendir = {token_dir}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
            "slots.removable = false\n")


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    module_path = softhsm_module_path()
    if not os.path.exists(module_path):
        pytest.skip(f"SoftHSM2 is not installed ({module_path})")
    if module_path in partition_module._LIBRARIES:
        # Loaded before us: the process is bound to whatever conf was in force then.
        conf = os.environ.get("SOFTHSM2_CONF", "/etc/softhsm/softhsm2.conf")
        yield SoftHsm(module_path, conf, None)
        return
    root = tmp_path_factory.mktemp("softhsm")
    token_dir = root / "tokens"
    token_dir.mkdir()
    conf_path = root / "softhsm2.conf"
    conf_path.write_text(_conf_text(token_dir))
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf_path)
    try:
        yield SoftHsm(module_path, str(conf_path), str(token_dir))
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture(scope="session")
def _two_tokens(softhsm: SoftHsm) -> tuple[SoftHsmToken, SoftHsmToken]:
    # Both before the first library load, so both go through softhsm2-util when possible.
    return softhsm.new_token("unit-a"), softhsm.new_token("unit-b")


@pytest.fixture(scope="session")
def hsm_partition(softhsm: SoftHsm,
                  _two_tokens: tuple[SoftHsmToken, SoftHsmToken]) -> Iterator[HsmPartition]:
    """A logged-in partition with a fresh domain key."""
    opened = softhsm.open_partition(_two_tokens[0])
    yield opened
    opened.close()


@pytest.fixture(scope="session")
def second_hsm_partition(softhsm: SoftHsm,
                         _two_tokens: tuple[SoftHsmToken, SoftHsmToken]) -> Iterator[HsmPartition]:
    """Another token with its own, different domain key."""
    opened = softhsm.open_partition(_two_tokens[1])
    yield opened
    opened.close()
