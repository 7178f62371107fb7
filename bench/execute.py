"""Executing committed blocks: ``python -m bench.consensus --part execute``.

What every validator spends on each issuance once its block is committed
(:meth:`handlers.replica.CaStateMachine.execute`), in this process, without
consensus or the network: one real replica (its state database, CT log, audit
log and software keystore in a temporary directory, built as
``tests/unit/test_replica.py`` builds them), which verifies every signature as
a validator other than the entry does. Its own intermediate and CT log keys
are announced in block 1. Then ``--blocks`` blocks each commit ``--per-block``
``issue`` decisions (fresh P-256 keys, real four-proof sets from a k=18 plot,
real precertificates) and the signed certificates of the previous block's
issuances (the compact form the CA makes: the SCT list, from the replica's own
log, and the signature; the replica assembles the DER): the pipeline of a
loaded cluster, where a certificate follows its issuance one block later.

Every decision is built and sealed before its block is timed; the figure is
the process's CPU time (every thread: the state's writer, the audit log's, the
CT log's tile writers) inside ``execute``, per issuance, that of the event
loop's thread alone, and the wall time per block.
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import stoq
from handlers.ca import LeafTemplate, LocalSigner, _x509, check_request, validity
from handlers.consensus import seal_batch
from handlers.consensus.bft import GENESIS_ID, Block
from handlers.replica import Outcome
from protocol import encode_deterministic
from protocol.ct_structs import certificate_tbs, encode_sct_list
from protocol.decisions import CompactCertificate, Decision, Issue
from tests.ca_fixtures import (
    BACKDATE,
    LIFETIME,
    PARAMS,
    Clock,
    ReplicaForTests,
    open_hierarchy,
    open_replica,
    open_stores,
    validator_key,
)
from trustchain._compose import local_keys

BLOCKS = 10
PER_BLOCK = 50


@dataclass
class ExecuteFigures:
    issuances: int
    cpu_us_per_issuance: float
    loop_us_per_issuance: float
    """The event loop's thread alone (the state's writer, the audit log and the CT
    log's tile writers work on other threads)."""
    wall_ms_per_block: float
    """Median wall time of one block of issuances and certificates."""


@dataclass
class _Issuance:
    leaf: LeafTemplate
    decision: Issue


def _csr(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def _prover(directory: Path) -> stoq.Prover:
    """A requester key and its k=18 plot (chiapos gets stuck on a few plot ids: then a
    new key, as ``tests/conftest.py`` does)."""
    for attempt in range(3):
        where = directory / f"requester-{attempt}"
        try:
            prover = stoq.Prover.open(where)
            prover.ensure_plot(18)
            return prover
        except stoq.ProverError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class _Run:
    """The replica, its clock and the blocks it executed."""

    def __init__(self, directory: Path, clock: Clock, replica: ReplicaForTests,
                 issuer: Any, sign: Any, entry: str, prover: stoq.Prover) -> None:
        self.directory = directory
        self.clock = clock
        self.replica = replica
        self.issuer = issuer
        self.sign = sign
        self.entry = entry
        self.prover = prover
        self.previous: Block | None = None
        epoch = int(clock() // PARAMS.epoch_length)
        self.beacon = stoq.Beacon(epoch=epoch, start=epoch * PARAMS.epoch_length,
                                  end=(epoch + 1) * PARAMS.epoch_length,
                                  value=hashlib.sha256(b"beacon %d" % epoch).digest(),
                                  params=PARAMS, development=True)
        self.credential = prover.credential_for(self.beacon)
        self.count = 0

    def block(self, decisions: list[Decision]) -> Block:
        previous = self.previous
        sealed = tuple(seal_batch([encode_deterministic(d.body()) for d in decisions],
                                  self.entry, self.sign)) if decisions else ()
        return Block(height=self.replica.machine.height + 1,
                     previous=previous.id if previous else GENESIS_ID,
                     time_ms=max(int(self.clock() * 1000),
                                 previous.time_ms + 1 if previous else 0),
                     proposer=self.entry, decisions=sealed,
                     app_hash=self.replica.machine.state_hash)

    async def execute(self, block: Block) -> tuple[Outcome, ...]:
        outcomes = (await self.replica.machine.execute(block)).outcomes
        self.previous = block
        self.clock.now += 1
        return tuple(o for o in outcomes if isinstance(o, Outcome))

    async def issuance(self) -> _Issuance:
        self.count += 1
        key = ec.generate_private_key(ec.SECP256R1())
        csr = _csr(key, f"n{self.count}.trust")
        at_ms = int(self.clock() * 1000)
        request = check_request(csr, self.replica.machine.policy)
        not_before, not_after = validity(at_ms, lifetime=LIFETIME, backdate=BACKDATE,
                                         issuer=self.issuer.certificate)
        leaf = LeafTemplate(issuer=self.issuer, request=request, serial=_x509.new_serial(),
                            not_before=not_before, not_after=not_after)
        precertificate = await LocalSigner().sign_leaf(leaf, [_x509.precertificate_poison()])
        proofs = self.prover.build("issue", hashlib.sha256(csr).digest(), self.beacon,
                                   self.credential).to_wire()
        return _Issuance(leaf=leaf, decision=Issue(
            csr=csr, proofs=proofs, precertificate=precertificate, renews=None,
            renewal_signature=None, at_ms=at_ms))

    async def certificate(self, issuance: _Issuance, outcome: Outcome) -> CompactCertificate:
        """The certificate decision as the CA makes it: the SCT list and the signature of
        the TBS they make with the precertificate."""
        assert outcome.accepted and outcome.logged is not None, outcome
        sct_list = encode_sct_list([self.replica.ct.sct(outcome.logged).sct.encode()])
        signature = await LocalSigner().sign_tbs(
            issuance.leaf.issuer, certificate_tbs(issuance.decision.precertificate, sct_list))
        return CompactCertificate(serial=_x509.serial_hex(issuance.leaf.serial),
                                  sct_list=sct_list, signature=signature,
                                  at_ms=int(self.clock() * 1000))


async def _measure(blocks: int, per_block: int) -> ExecuteFigures:
    with tempfile.TemporaryDirectory(prefix="bench-execute-") as tmp:
        directory = Path(tmp)
        clock = Clock(float(int(time.time())))
        data, keystore, audit = open_stores(directory / "node", clock)
        hierarchy = open_hierarchy(data, keystore, audit, clock)
        signer, validator = validator_key(keystore)
        replica = await open_replica(directory / "node", root_der=hierarchy.root_der,
                                     clock=clock, stores=(data, keystore, audit))
        try:
            assert hierarchy.issuer is not None
            run = _Run(directory, clock, replica, hierarchy.issuer, signer.sign, validator.id,
                       _prover(directory))
            keys = local_keys(hierarchy, replica.ct, None, clock)(int(clock() * 1000))
            (announced,) = await run.execute(run.block([keys]))
            assert announced.accepted, announced
            waiting: list[tuple[_Issuance, Outcome]] = []
            cpu: list[float] = []
            loop: list[float] = []
            wall: list[float] = []
            for _ in range(blocks + 1):
                issuances = [await run.issuance() for _ in range(per_block)] \
                    if len(cpu) < blocks else []
                certificates = [await run.certificate(i, o) for i, o in waiting]
                block = run.block([*(i.decision for i in issuances), *certificates])
                started, ticks = time.process_time(), time.perf_counter()
                thread = time.thread_time()
                outcomes = await run.execute(block)
                if issuances and certificates:
                    cpu.append(time.process_time() - started)
                    loop.append(time.thread_time() - thread)
                    wall.append(time.perf_counter() - ticks)
                assert all(o.accepted for o in outcomes), [o for o in outcomes
                                                           if not o.accepted][:1]
                waiting = list(zip(issuances, outcomes[:len(issuances)], strict=True))
            return ExecuteFigures(issuances=len(cpu) * per_block,
                                  cpu_us_per_issuance=sum(cpu) / (len(cpu) * per_block) * 1e6,
                                  loop_us_per_issuance=sum(loop) / (len(loop) * per_block) * 1e6,
                                  wall_ms_per_block=statistics.median(wall) * 1e3)
        finally:
            hierarchy.authorities.close()
            await replica.close()


def execute_report(blocks: int = BLOCKS, per_block: int = PER_BLOCK) -> str:
    """Markdown: CPU per issuance of executing committed blocks (see the module)."""
    figures = asyncio.run(_measure(blocks, per_block))
    return "\n".join([
        f"### Executing blocks: {per_block} issuances and {per_block} certificates a block",
        "",
        "| issuances timed | CPU µs / issuance (issue + certificate) | of which the event "
        "loop's thread | wall ms / block |",
        "|---|---|---|---|",
        f"| {figures.issuances} | {figures.cpu_us_per_issuance:.0f} | "
        f"{figures.loop_us_per_issuance:.0f} | {figures.wall_ms_per_block:.1f} |",
    ])
