"""``ca.signing_workers``: leaves (precertificate and final certificate) signed in
worker processes, with software keys and on a SoftHSM2 token; a dead worker is replaced."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

import stoq
from handlers.ca import SigningWorkers
from protocol import TrustChainError
from protocol import ct_structs as ct

from ..helpers import CddlChecker, Requester, RunningNode, running_node
from ..softhsm import SoftHsmToken
from .test_ca import make_csr, openssl_verify, pkilint, write_pems

ENGINE = "qh3"
WORKERS = "[ca]\nsigning_workers = 2\n"


async def _issue_and_check(node: RunningNode, tmp_path: Path, data: Path,
                           requester: Requester, names: list[str]) -> dict[str, Any]:
    result = await requester.issue(make_csr(ec.generate_private_key(ec.SECP256R1()), names))
    cert = x509.load_der_x509_certificate(result["certificate"])
    issuer = x509.load_der_x509_certificate(result["chain"][0])
    (sct,) = ct.embedded_scts(cert)  # CT is on: precertificate logged, SCT embedded
    key = (await stoq.ShardKeys.fetch(requester.client)).keys[0]
    ct.verify_embedded_sct(cert, issuer, sct, key)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_oid(ct.POISON_OID)
    cert_path, chain_path = write_pems(tmp_path, result)
    verified = openssl_verify(data / "root.pem", chain_path, cert_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    linted = pkilint(cert_path)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    return result


async def test_workers_sign_verifiable_certificates(tmp_path: Path, cddl: CddlChecker,
                                                   prover: stoq.Prover) -> None:
    data = tmp_path / "node"
    async with running_node(data, ENGINE, WORKERS, checker=cddl) as node, \
            await node.client() as client:
        workers = node.node.ca.signer
        assert isinstance(workers, SigningWorkers)
        assert workers is not None and len(workers.pids) == 2
        await _issue_and_check(node, tmp_path, data, Requester(client, prover),
                               ["www.hypermesh", "api.trust"])
        assert workers.restarts == 0


async def test_a_killed_worker_is_replaced_and_its_request_fails(
        tmp_path: Path, cddl: CddlChecker, prover: stoq.Prover) -> None:
    data = tmp_path / "node"
    async with running_node(data, ENGINE, WORKERS, checker=cddl) as node, \
            await node.client() as client:
        workers = node.node.ca.signer
        assert isinstance(workers, SigningWorkers)
        assert workers is not None
        requester = Requester(client, prover)
        await requester._stake()
        first = set(workers.pids)
        for pid in first:  # hold both, so the request waits inside one of them
            os.kill(pid, signal.SIGSTOP)
        try:
            task = asyncio.ensure_future(requester.issue(make_csr(
                ec.generate_private_key(ec.SECP256R1()), ["doomed.trust"])))
            for _ in range(600):
                busy = {w.pid for w in workers._live if w.pending}
                if busy or task.done():
                    break
                await asyncio.sleep(0.05)
            assert busy, "the request never reached a signing worker"
            (victim,) = busy
            os.kill(victim, signal.SIGKILL)
        finally:
            for pid in first:
                if pid not in busy:
                    os.kill(pid, signal.SIGCONT)
        with pytest.raises(TrustChainError) as failed:
            await asyncio.wait_for(task, 20)
        assert failed.value.code.value == "internal"
        assert "signing worker" in failed.value.message
        assert workers.restarts == 1
        # The next issuances work: a new worker takes the dead one's place.
        await _issue_and_check(node, tmp_path, data, requester, ["after.trust"])
        await _issue_and_check(node, tmp_path, data, requester, ["again.trust"])
        assert victim not in workers.pids
        for _ in range(100):
            if len(workers.pids) == 2:
                break
            await asyncio.sleep(0.05)
        assert len(workers.pids) == 2


async def test_workers_sign_with_softhsm2(tmp_path: Path, cddl: CddlChecker,
                                          prover: stoq.Prover,
                                          softhsm_token: SoftHsmToken,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTCHAIN_HSM_PIN", softhsm_token.pin)
    extra = (WORKERS + f'[ca.hsm]\nprovider = "softhsm2"\n'
             f'token_label = "{softhsm_token.token_label}"\n')
    data = tmp_path / "node"
    async with running_node(data, ENGINE, extra, checker=cddl) as node, \
            await node.client() as client:
        workers = node.node.ca.signer
        assert isinstance(workers, SigningWorkers)
        assert workers is not None and len(workers.pids) == 2
        assert softhsm_token.pin not in repr(workers._settings)
        requester = Requester(client, prover)
        await _issue_and_check(node, tmp_path, data, requester, ["hsm.hypermesh", "hsm.trust"])
        # A new intermediate (its key made in the token by the node): the workers find it.
        assert node.node.services.hierarchy is not None
        rotated = node.node.services.hierarchy.rotate_intermediate(reason="test")
        result = await _issue_and_check(node, tmp_path, data, requester, ["rotated.trust"])
        assert result["chain"][0] == rotated.der
