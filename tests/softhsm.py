"""A real SoftHSM2 token in a temporary directory, for tests (no PKCS#11 mocks).

SoftHSM2 reads ``SOFTHSM2_CONF`` once, when the module is first initialised in a
process, and never sees tokens created after that. So a process gets one
token: the first :func:`make_token` creates it and sets ``SOFTHSM2_CONF`` in
``os.environ`` (child processes inherit it), and later calls return the same
token. Use it from a session-scoped fixture.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pkcs11

SOFTHSM2_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@dataclass(frozen=True)
class SoftHsmToken:
    """What ``open_keystore(provider="softhsm2", ...)`` needs, plus where it lives."""

    module_path: str
    token_label: str
    pin: str
    so_pin: str
    conf_path: Path


_token: SoftHsmToken | None = None


def make_token(directory: Path) -> SoftHsmToken:
    """Create this process's SoftHSM2 token under ``directory`` (or return the existing one)."""
    global _token
    if _token is not None:
        return _token
    if shutil.which("softhsm2-util") is None or not os.path.exists(SOFTHSM2_MODULE):
        raise RuntimeError("SoftHSM2 is not installed (Debian package softhsm2)")
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                    "log.level = ERROR\nslots.removable = false\n")
    # Distinctive PINs, so a test can tell whether one leaked into a message.
    # A fresh label too, in case ``directory`` already holds a token from an earlier run.
    token = SoftHsmToken(module_path=SOFTHSM2_MODULE,
                         token_label=f"trustchain-test-{secrets.token_hex(3)}",
                         pin=f"user-{secrets.token_hex(6)}", so_pin=f"so-{secrets.token_hex(6)}",
                         conf_path=conf)
    os.environ["SOFTHSM2_CONF"] = str(conf)
    done = subprocess.run(["softhsm2-util", "--init-token", "--free",
                           "--label", token.token_label, "--pin", token.pin,
                           "--so-pin", token.so_pin],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"softhsm2-util --init-token failed: {done.stderr.strip()}")
    labels = [t.label for t in pkcs11.lib(SOFTHSM2_MODULE).get_tokens()]
    if token.token_label not in labels:
        raise RuntimeError(f"SoftHSM2 in this process does not see the new token (it sees "
                           f"{labels}): the module was initialised before SOFTHSM2_CONF "
                           f"pointed to {conf}")
    _token = token
    return token
