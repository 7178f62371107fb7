"""node.health sees every service: real faults (files the node cannot write, a stopped
service) make it ``degraded`` with the reason, and it recovers when the fault goes.

The node runs as root here (CI does), so a read-only mode would not stop it: the faults
use the immutable attribute (``chattr +i``), which stops root too, even on a file the
node already has open."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkcs11
import pytest

from protocol import TrustChainError
from store import KeyStoreError

from ..helpers import CddlChecker, RunningNode, running_node
from ..softhsm import SoftHsmToken

ENGINE = "qh3"


def immutable_works(directory: Path) -> bool:
    """Whether ``chattr +i`` stops writes here (root on ext4, xfs, btrfs: yes)."""
    if shutil.which("chattr") is None:
        return False
    probe = directory / "probe"
    probe.mkdir()
    try:
        if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode:
            return False
        try:
            (probe / "x").write_text("x")
        except OSError:
            return True
        return False
    finally:
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
        shutil.rmtree(probe, ignore_errors=True)


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """``path`` (a file or a directory) cannot be changed until the block ends."""
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.fixture
def faults(tmp_path: Path) -> None:
    if not immutable_works(tmp_path):
        pytest.skip("needs chattr +i to stop writes (root on a filesystem that has it)")


async def health(node: RunningNode, cddl: CddlChecker) -> dict[str, Any]:
    """``node.health``, trusting the CA's root (the node may have renewed its certificate)."""
    async with await node.client(pin=None, cafile=str(node.node.data_dir / "root.pem")) \
            as client:
        answer: dict[str, Any] = await client.request("node.health")
    return answer


async def wait_for(node: RunningNode, cddl: CddlChecker, check: str, failing: bool,
                   timeout: float = 10.0) -> dict[str, Any]:
    """The health answer once ``check`` fails (``failing``) or passes."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await health(node, cddl)
        if (check in answer["reasons"]) == failing or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.1)


async def test_an_audit_write_failure_degrades_health(tmp_path: Path, cddl: CddlChecker,
                                                      faults: None) -> None:
    async with running_node(tmp_path / "node", ENGINE, checker=cddl) as node:
        log = tmp_path / "node" / "audit" / "audit.log"
        with unwritable(log):
            async with await node.client() as client:
                with pytest.raises(TrustChainError):  # audited, and the record fails
                    await client.request("ca.issue", {"csr": b"junk"})
            answer = await wait_for(node, cddl, "audit", True)
        assert answer["status"] == "degraded" and answer["checks"]["audit"] is False
        assert "a write failed" in answer["reasons"]["audit"], answer
        assert "restarts" in answer["reasons"]["audit"]
        assert set(answer["reasons"]) == {"audit"}, answer


async def test_an_audit_key_removed_from_the_token_degrades_health(
        tmp_path: Path, cddl: CddlChecker, softhsm_token: SoftHsmToken,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit key is gone from the HSM: the records are still written, the timed
    checkpoint (every second) cannot be signed, and health says so."""
    monkeypatch.setenv("TRUSTCHAIN_HSM_PIN", softhsm_token.pin)
    extra = f'[ca.hsm]\nprovider = "softhsm2"\ntoken_label = "{softhsm_token.token_label}"\n'
    async with running_node(tmp_path / "node", ENGINE, extra, checker=cddl) as node:
        assert (await health(node, cddl))["reasons"] == {}
        token = pkcs11.lib(softhsm_token.module_path).get_token(
            token_label=softhsm_token.token_label)
        # the node's keystore has logged this process in: a session sees its keys
        with token.open(rw=True) as session:
            keys = list(session.get_objects({pkcs11.Attribute.LABEL: "audit"}))
            assert keys
            for key in keys:
                key.destroy()
        async with await node.client() as client:
            with pytest.raises(TrustChainError):  # a record the next checkpoint must cover
                await client.request("ca.issue", {"csr": b"junk"})
        answer = await wait_for(node, cddl, "audit", True)
        assert answer["status"] == "degraded", answer
        assert answer["reasons"]["audit"].startswith("checkpoints cannot be signed: "), answer
        assert node.node.services is not None and node.node.services.audit.unsigned


async def test_rotation_and_ct_failures_degrade_health_until_they_pass(
        tmp_path: Path, cddl: CddlChecker, faults: None) -> None:
    # rotation_interval 60 s from a notBefore back-dated 300 s: every pass renews
    extra = '[ca]\nrotation_interval = "60s"\n'
    async with running_node(tmp_path / "node", ENGINE, extra, checker=cddl) as node:
        services = node.node.services
        assert services is not None
        rotator = services.rotator
        with unwritable(tmp_path / "node" / "tls"):
            with pytest.raises(PermissionError):
                await rotator.check()  # the pass the rotation loop runs every minute
            answer = await health(node, cddl)
        assert answer["status"] == "degraded" and answer["checks"]["rotation"] is False
        assert answer["reasons"]["rotation"].startswith("the latest rotation pass failed: ")
        assert "Permission" in answer["reasons"]["rotation"] or \
            "not permitted" in answer["reasons"]["rotation"], answer
        await rotator.check()
        answer = await health(node, cddl)
        assert "rotation" not in answer["reasons"] and answer["status"] == "ok", answer

        # the CT log cannot install its tiles: the node's renewed certificate is logged
        tiles = [p for p in (tmp_path / "node" / "ct").rglob("tile") if p.is_dir()]
        assert tiles, list((tmp_path / "node" / "ct").rglob("*"))
        with contextlib.ExitStack() as stack:
            for directory in tiles:
                for sub in [directory, *(p for p in directory.rglob("*") if p.is_dir())]:
                    stack.enter_context(unwritable(sub))
            await rotator.check()
            answer = await wait_for(node, cddl, "ct", True)
        assert answer["checks"]["ct"] is False, answer
        assert answer["reasons"]["ct"].startswith("tiles could not be installed"), answer
        await rotator.check()  # the next entries install
        answer = await wait_for(node, cddl, "ct", False)
        assert answer["status"] == "ok", answer

        # a stopped CT log
        await services.ct.log.stop()
        answer = await health(node, cddl)
        assert answer["reasons"]["ct"] == "the log is stopped: it signs no fresh tree heads"


async def test_a_dns_signing_failure_degrades_health(tmp_path: Path, cddl: CddlChecker,
                                                     faults: None) -> None:
    async with running_node(tmp_path / "node", ENGINE, checker=cddl) as node:
        services = node.node.services
        assert services is not None and services.dns is not None
        zones = services.dns.zones
        later = time.time() + 40 * 86400  # past the ZSK's lifetime: a new key is due
        with unwritable(tmp_path / "node" / "keys"):
            with pytest.raises(KeyStoreError):
                zones.maintain(later)  # the maintenance the zones run every minute
            answer = await health(node, cddl)
        assert answer["checks"]["dns"] is False, answer
        assert answer["reasons"]["dns"].startswith("the zones could not be updated or signed"), \
            answer
        zones.maintain(later)
        answer = await health(node, cddl)
        assert "dns" not in answer["reasons"], answer
