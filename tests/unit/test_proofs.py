"""The four-proof set without a network: real chiapos plots and proofs, real chiavdf VDFs,
the real replicated state (SQLite), beacon store and audit log in a temp dir, and an
injected clock.

Every proof is accepted when honest and refused when it comes from another key,
another epoch or another request, with a bit flipped, below the difficulty or
the stake, or replayed; epoch credentials are verified once and then cached.

Stake and used work are replicated state: they change only when a block is
executed, so the tests change them the way a validator does, with blocks of
sealed decisions executed by the real state machine (:class:`Replica`): genesis
stake, ``stake`` credits, and ``issue`` decisions that commit their work.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

import stoq
from handlers.ca import Publishers, _x509, check_request, validity
from handlers.consensus import BeaconChain, ProofVerifier, seal
from handlers.consensus.bft import Block
from handlers.ct import ChainValidator, CtLog
from handlers.replica import (
    CaStateMachine,
    Decision,
    Issue,
    Outcome,
    StakeCredit,
    ValidatorKeys,
    raise_refused,
)
from protocol import ProofInvalid, encode_deterministic
from protocol.ops.consensus import (
    VDF_FORM_SIZE,
    ProofParams,
    TimeProof,
    beacon_statement,
    binding_statement,
    issue_digest,
    key_id,
    leading_zero_bits,
    parse_proofs,
    plot_id_for,
    work_hash,
    work_prefix,
)
from stoq._prover import sign_binding
from store import (
    AuditLog,
    BeaconStore,
    KeyStore,
    StateDatabase,
    TileDirectory,
    open_keystore,
    verify_log,
    verify_signature,
)

from ..state_fixtures_ct import BACKDATE, KEY, LIFETIME, ME, POLICY, cluster_ca

EPOCH_LENGTH = 600
START = 1_800_000_000.0  # a multiple of EPOCH_LENGTH: epoch 3,000,000 starts here
PARAMS = ProofParams(minimum_stake=1000, minimum_work_difficulty=8, plot_size=18,
                     vdf_iterations=1000, epoch_length=EPOCH_LENGTH)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Replica:
    """This validator's replicated state machine over ``state``: the only way stake and
    used work change. Executes blocks of decisions sealed by one validator, at the
    clock's time; the validator's issuing intermediate is ``ca``'s."""

    def __init__(self, directory: Path, state: StateDatabase, keystore: KeyStore,
                 audit: AuditLog, clock: Clock) -> None:
        self.clock = clock
        self.ca = cluster_ca(clock())
        self.ct = CtLog(tiles=TileDirectory.in_directory(directory / "ct"), state=state,
                        keystore=keystore, origin="unit.trust/ct", clock=clock)
        self.ct.open()
        self.machine = CaStateMachine(
            state=state, ct=self.ct, chains=ChainValidator([self.ca.root_der], clock=clock),
            policy=POLICY, root_der=self.ca.root_der, node_names={}, publishers=Publishers(),
            audit=audit.append_all_async, epoch_length=EPOCH_LENGTH, lifetime=LIFETIME,
            backdate=BACKDATE, minimum_stake=PARAMS.minimum_stake, development=True,
            clock=clock)
        self.previous = bytes(32)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def execute(self, *decisions: Decision) -> tuple[Outcome, ...]:
        """One block holding ``decisions``, committed and executed."""
        block = Block(height=self.machine.height + 1, previous=self.previous,
                      time_ms=self.now_ms(), proposer=ME.id,
                      decisions=tuple(seal(d.body(), ME.id, KEY.sign) for d in decisions))
        executed = await self.machine.execute(block)
        self.previous = block.id
        return tuple(executed.outcomes)

    async def credit(self, key: str, amount: int, reason: str = "test") -> None:
        """A committed ``stake`` decision: ``key``'s stake becomes ``amount``."""
        (outcome,) = await self.execute(StakeCredit(key_id=key, amount=amount, reason=reason,
                                                    at_ms=self.now_ms()))
        raise_refused(outcome)

    async def issue(self, csr: bytes, proofs: Any) -> Outcome:
        """A committed ``issue`` decision for ``csr`` with ``proofs`` (its work is used
        if it is accepted), its precertificate signed by this validator."""
        if self.machine.directory.of(ME.id) is None:
            raise_refused((await self.execute(ValidatorKeys(
                intermediates=(self.ca.der,), ct_logs=(), dnskeys=(), admins=(),
                at_ms=self.now_ms())))[0])
        request = check_request(csr, POLICY)
        at_ms = self.now_ms()
        not_before, not_after = validity(at_ms, lifetime=LIFETIME, backdate=BACKDATE,
                                         issuer=self.ca.intermediate)
        precertificate = _x509.sign_leaf(
            self.ca.intermediate, request, serial=_x509.new_serial(), not_before=not_before,
            not_after=not_after, extensions=[_x509.precertificate_poison()],
            private_key=self.ca.key)
        (outcome,) = await self.execute(Issue(csr=csr, proofs=proofs,
                                              precertificate=precertificate, at_ms=at_ms))
        return outcome

    async def close(self) -> None:
        await self.ct.stop()


def make_csr(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


@dataclass
class World:
    """A verifier over the real replicated state, beacon chain (software key) and audit
    log, and the state machine that changes that state."""

    directory: Path
    verifier: ProofVerifier
    state: StateDatabase
    beacon_store: BeaconStore
    beacons: BeaconChain
    audit: AuditLog
    clock: Clock
    prover: stoq.Prover
    replica: Replica
    keystore: KeyStore

    async def beacon(self) -> stoq.Beacon:
        record = await self.beacons.current()
        return stoq.Beacon(epoch=record.epoch, start=record.start,
                           end=record.start + EPOCH_LENGTH, value=record.value, params=PARAMS,
                           development=True)

    async def proofs(self, csr: bytes = b"csr", prover: stoq.Prover | None = None
                     ) -> dict[str, Any]:
        prover = prover or self.prover
        beacon = await self.beacon()
        credential = prover.credential_for(beacon)
        return prover.build("issue", issue_digest(csr), beacon, credential).to_wire()

    async def verify(self, proofs: Any, csr: bytes = b"csr") -> None:
        await self.verifier.verify("issue", issue_digest(csr), proofs)

    async def close(self) -> None:
        await self.verifier.close()
        await self.replica.close()
        await self.state.drain()
        self.state.close()
        self.beacon_store.close()
        self.audit.close()


def open_stores(tmp: Path, clock: Clock, keystore: KeyStore, audit: AuditLog,
                params: ProofParams = PARAMS, workers: int = 0
                ) -> tuple[StateDatabase, BeaconStore, BeaconChain, ProofVerifier]:
    """What a node opens at start: the state, the beacons and a verifier over them."""
    state = StateDatabase(tmp / "state" / "state.sqlite3")
    beacon_store = BeaconStore(tmp / "consensus" / "beacons.sqlite3")
    beacons = BeaconChain(store=beacon_store, signer=keystore.get_or_create("beacon"),
                          epoch_length=EPOCH_LENGTH, audit=audit.append_async, clock=clock)
    verifier = ProofVerifier(params=params, ledger=state, beacons=beacons, workers=workers,
                             audit=audit.append_async, clock=clock)
    return state, beacon_store, beacons, verifier


async def make_world(tmp: Path, plotted: Path, *, workers: int = 0,
                     params: ProofParams = PARAMS) -> World:
    clock = Clock(START)
    keystore = open_keystore(provider="software", data_dir=tmp)
    audit = AuditLog(tmp / "audit.log", signer=keystore.get_or_create("audit"), clock=clock)
    state, beacon_store, beacons, verifier = open_stores(tmp, clock, keystore, audit, params,
                                                         workers)
    prover = stoq.Prover.open(plotted)
    replica = Replica(tmp, state, keystore, audit, clock)
    await replica.machine.open({prover.key_id: 1000})  # the genesis stake
    return World(directory=tmp, verifier=verifier, state=state, beacon_store=beacon_store,
                 beacons=beacons, audit=audit, clock=clock, prover=prover, replica=replica,
                 keystore=keystore)


def audit_records(path: Path, kind: str) -> list[dict[str, Any]]:
    """The ``data`` of every record of ``kind`` in the audit log at ``path``."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["data"] for r in records if r["kind"] == kind]


@pytest.fixture
async def world(tmp_path: Path, plotted: Path) -> AsyncIterator[World]:
    made = await make_world(tmp_path, plotted)
    yield made
    await made.close()


@pytest.fixture(scope="module")
def other_plotted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second requester with its own k=18 plot (about 1 s)."""
    directory = tmp_path_factory.mktemp("other-requester")
    stoq.Prover.open(directory).ensure_plot(18)
    return directory


def resign(wire: dict[str, Any], prover: stoq.Prover, csr: bytes = b"csr") -> dict[str, Any]:
    """Sign the binding again over ``wire``'s (changed) parts, with ``prover``'s key."""
    proofs = parse_proofs(wire)
    statement = binding_statement(op="issue", request=issue_digest(csr), epoch=proofs.epoch,
                                  space=proofs.space.digest(), time=proofs.time.digest(),
                                  nonce=proofs.nonce)
    return {**wire, "binding": sign_binding(prover.key, statement)}


def rework(wire: dict[str, Any], csr: bytes = b"csr", difficulty: int = 8) -> dict[str, Any]:
    """Solve the work again for ``wire``'s key and epoch."""
    prefix = work_prefix("issue", issue_digest(csr), key_id(wire["requester_key"]),
                         wire["epoch"])
    return {**wire, "work": {"nonce": stoq.solve_work(prefix, difficulty)}}


def flip(data: bytes, bit: int) -> bytes:
    changed = bytearray(data)
    changed[bit // 8] ^= 1 << (bit % 8)
    return bytes(changed)


async def refused(world: World, proofs: Any, proof: str, match: str = "",
                  csr: bytes = b"csr") -> ProofInvalid:
    with pytest.raises(ProofInvalid) as info:
        await world.verify(proofs, csr)
    assert info.value.details["proof"] == proof, info.value.message
    assert info.value.message.startswith(f"{proof}: ")
    assert match in info.value.message, info.value.message
    return info.value


# --- honest sets, caching --------------------------------------------------------------------


async def test_honest_set_is_accepted_and_credentials_are_cached(world: World) -> None:
    await world.verify(await world.proofs())
    stats = world.verifier.stats
    assert (stats.space_verified, stats.time_verified) == (1, 1)  # cold: verified in full
    assert (stats.space_cached, stats.time_cached) == (0, 0)
    for csr in (b"second", b"third"):
        await world.verify(await world.proofs(csr), csr)  # fresh work, same credential
    assert (stats.space_verified, stats.time_verified) == (1, 1)
    assert (stats.space_cached, stats.time_cached) == (2, 2)  # warm: remembered by hash
    assert stats.admitted == 3


async def test_cache_holds_for_the_epoch_and_the_next_only(world: World) -> None:
    stats = world.verifier.stats
    proofs = await world.proofs()
    await world.verify(proofs)
    world.clock.now += EPOCH_LENGTH  # the next epoch: the previous one is still accepted
    await world.beacons.current()
    await world.verify(await world.proofs(b"later"), b"later")  # a new credential: a miss
    assert stats.space_verified == 2 and stats.time_verified == 2
    old = resign(rework(copy.deepcopy(proofs), b"old"), world.prover, b"old")
    await world.verify(old, b"old")  # the previous epoch's credential: a hit
    assert stats.space_cached == 1 and stats.time_cached == 1
    world.clock.now += EPOCH_LENGTH  # two epochs on: refused, and forgotten
    await world.beacons.current()
    stale = resign(rework(copy.deepcopy(proofs), b"stale"), world.prover, b"stale")
    await refused(world, stale, "time", "accepts epochs", b"stale")
    await world.verify(await world.proofs(b"now"), b"now")
    assert proofs["epoch"] not in world.verifier._space_ok
    assert proofs["epoch"] not in world.verifier._time_ok


async def test_vdf_in_a_worker_process_and_a_dying_worker(tmp_path: Path, plotted: Path) -> None:
    world = await make_world(tmp_path, plotted, workers=1)
    try:
        await world.verify(await world.proofs())  # cold path through the worker
        assert world.verifier.stats.time_verified == 1
        workers = world.verifier._workers
        assert workers is not None and len(workers._idle) == 1
        workers._idle[0].process.kill()  # whatever killed it, the caller gets an answer
        await workers._idle[0].process.wait()
        other = await world.proofs(b"x")
        world.verifier._time_ok.clear()  # force a cold verification
        await refused(world, other, "time", "verifier failed", b"x")
        assert world.verifier.worker_restarts == 1
        await world.verify(await world.proofs(b"y"), b"y")  # a new worker serves
    finally:
        await world.close()


# --- each proof refused -------------------------------------------------------------------------


async def test_missing_set_and_each_missing_part(world: World) -> None:
    await refused(world, None, "binding", "needs the four-proof set")
    honest = await world.proofs()
    owners = {"epoch": "time", "requester_key": "stake", "space": "space", "time": "time",
              "work": "work", "binding": "binding"}
    for key, proof in owners.items():
        partial = {k: v for k, v in honest.items() if k != key}
        error = await refused(world, partial, proof, "missing")
        assert error.details["field"] == f"proofs.{key}"
    await world.verify(honest)  # none of those used it up


async def test_space_refusals(world: World, other_plotted: Path) -> None:
    honest = await world.proofs()
    other = stoq.Prover.open(other_plotted)
    await world.replica.credit(other.key_id, 5000)
    # another key's space proof: its plot id is not this key's
    theirs = await world.proofs(prover=other)
    stolen = resign({**honest, "space": theirs["space"]}, world.prover)
    await refused(world, stolen, "space", "not bound")
    # ... and with this key's plot id written over it, the proof does not verify
    forged = {**theirs["space"], "plot_id": plot_id_for(world.prover.spki, 18)}
    await refused(world, resign({**honest, "space": forged}, world.prover), "space",
                  "does not verify")
    # another epoch's challenge (the proof for a different beacon)
    beacon = await world.beacon()
    other_epoch = stoq.Beacon(epoch=beacon.epoch, start=beacon.start, end=beacon.end,
                              value=hashlib.sha256(b"another beacon").digest(), params=PARAMS,
                              development=True)
    credential = world.prover.credential_for(other_epoch)
    await refused(world, resign({**honest, "space": credential.space.to_wire()}, world.prover),
                  "space", "does not verify")
    # one bit flipped, in the proof or in the plot id
    for bit in (0, 77, 8 * 144 - 1):
        space = {**honest["space"], "proof": flip(honest["space"]["proof"], bit)}
        await refused(world, resign({**honest, "space": space}, world.prover), "space",
                      "does not verify")
    space = {**honest["space"], "plot_id": flip(honest["space"]["plot_id"], 3)}
    await refused(world, resign({**honest, "space": space}, world.prover), "space", "not bound")
    # another challenge index than the one the proof answers
    space = {**honest["space"], "index": (honest["space"]["index"] + 1) % 32}
    await refused(world, resign({**honest, "space": space}, world.prover), "space",
                  "does not verify")
    await world.verify(honest)


async def test_space_plot_smaller_than_required(tmp_path: Path, plotted: Path) -> None:
    strict = ProofParams(minimum_stake=1000, minimum_work_difficulty=8, plot_size=19,
                         vdf_iterations=1000, epoch_length=EPOCH_LENGTH)
    world = await make_world(tmp_path, plotted, params=strict)
    try:
        lenient = await world.proofs()  # made against k >= 18 (PARAMS)
        await refused(world, lenient, "space", "k >= 19")
    finally:
        await world.close()


async def test_time_refusals(world: World, other_plotted: Path) -> None:
    honest = await world.proofs()
    other = stoq.Prover.open(other_plotted)
    await world.replica.credit(other.key_id, 5000)
    theirs = await world.proofs(prover=other)
    # another key's VDF: a form of another discriminant (chiavdf raises; a clear answer)
    stolen = resign({**honest, "time": theirs["time"]}, world.prover)
    error = await refused(world, stolen, "time", "not a form of this key's discriminant")
    assert error.details["field"] == "proofs.time"
    # another epoch's VDF (another beacon)
    beacon = await world.beacon()
    elsewhere = stoq.Beacon(epoch=beacon.epoch, start=beacon.start, end=beacon.end,
                            value=hashlib.sha256(b"another beacon").digest(), params=PARAMS,
                            development=True)
    credential = world.prover.credential_for(elsewhere)
    await refused(world, resign({**honest, "time": credential.time.to_wire()}, world.prover),
                  "time")
    # one bit flipped anywhere in the output or the proof, padding bits included
    for name in ("output", "proof"):
        for bit in (0, 9, 400, 8 * VDF_FORM_SIZE - 1, 8 * VDF_FORM_SIZE - 3):
            changed = {**honest["time"], name: flip(honest["time"][name], bit)}
            await refused(world, resign({**honest, "time": changed}, world.prover), "time")
    # the same VDF claimed for more (or fewer) iterations than it ran
    for iterations in (1001, 999_999):
        changed = {**honest["time"], "iterations": iterations}
        await refused(world, resign({**honest, "time": changed}, world.prover), "time",
                      "does not verify")
    # too few iterations for this node
    weak = stoq.Beacon(epoch=beacon.epoch, start=beacon.start, end=beacon.end,
                       value=beacon.value, params=ProofParams(
                           minimum_stake=1000, minimum_work_difficulty=8, plot_size=18,
                           vdf_iterations=10, epoch_length=EPOCH_LENGTH), development=True)
    short = stoq._prover.time_proof(weak.value, weak.epoch, world.prover.spki, 10)
    await refused(world, resign({**honest, "time": short.to_wire()}, world.prover), "time",
                  "too few")
    await world.verify(honest)


def test_non_canonical_vdf_encodings_are_refused() -> None:
    """chiavdf's own check ignores the top bits of the last byte of about half of the
    compressed forms (one form, several encodings); the verifier accepts only the
    canonical encoding, so that no flipped bit passes."""
    import chiavdf

    from handlers.consensus._native import verify_time
    from protocol.ops.consensus import VDF_GENERATOR
    found = 0
    for i in range(40):
        seed = hashlib.sha256(b"malleable %d" % i).digest()
        discriminant = chiavdf.create_discriminant(seed, 1024)
        result = chiavdf.prove(seed, VDF_GENERATOR, 1024, 1000, "")
        forms = {"output": result[:VDF_FORM_SIZE], "proof": result[VDF_FORM_SIZE:]}
        assert verify_time(seed, 1000, forms["output"], forms["proof"]) is None
        for name, form in forms.items():
            decoded = chiavdf.bqfc_deserialize(discriminant, form, False)
            for bit in range(8 * VDF_FORM_SIZE - 8, 8 * VDF_FORM_SIZE):
                changed = {**forms, name: flip(form, bit)}
                with contextlib.suppress(RuntimeError):
                    if chiavdf.bqfc_deserialize(discriminant, changed[name], False) != decoded:
                        continue
                    assert chiavdf.verify_wesolowski(  # the library says yes ...
                        discriminant, VDF_GENERATOR, changed["output"], changed["proof"], 1000)
                    problem = verify_time(seed, 1000, changed["output"], changed["proof"])
                    assert problem is not None and "not a form" in problem  # ... we say no
                    found += 1
        if found >= 10:
            break
    assert found >= 10, "no malleable encoding met: the test shows nothing"


async def test_work_refusals(world: World) -> None:
    honest = await world.proofs()
    # for another request: the nonce was found for another CSR (one whose work prefix the
    # nonce does not satisfy by chance, 1 in 256)
    other = next(c for c in (b"other-%d" % i for i in range(100))
                 if leading_zero_bits(work_hash(work_prefix(
                     "issue", issue_digest(c), key_id(world.prover.spki), honest["epoch"]),
                     honest["work"]["nonce"])) < 8)
    await refused(world, resign(honest, world.prover, other), "work", csr=other)
    # below the difficulty: a nonce whose hash has fewer zero bits
    prefix = work_prefix("issue", issue_digest(b"csr"), key_id(world.prover.spki),
                         honest["epoch"])
    weak = next(n.to_bytes(8, "big") for n in range(1000)
                if leading_zero_bits(work_hash(prefix, n.to_bytes(8, "big"))) < 8)
    error = await refused(world, resign({**honest, "work": {"nonce": weak}}, world.prover),
                          "work", "8 are required")
    assert error.details["field"] == "proofs.work.nonce"
    # for another key: the same nonce under another requester key (a key for which
    # that nonce happens to reach 8 bits too, 1 in 256, is skipped)
    for _ in range(20):
        other_key = stoq.Prover(world.prover.directory, ed25519.Ed25519PrivateKey.generate())
        if leading_zero_bits(work_hash(work_prefix(
                "issue", issue_digest(b"csr"), key_id(other_key.spki), honest["epoch"]),
                honest["work"]["nonce"])) < 8:
            break
    await world.replica.credit(other_key.key_id, 1000)
    swapped = {**honest, "requester_key": other_key.spki}
    await refused(world, resign(swapped, other_key), "work", "8 are required")
    # one bit flipped in the nonce
    flipped = {**honest, "work": {"nonce": flip(honest["work"]["nonce"], 63)}}
    prefix_hash = work_hash(prefix, flipped["work"]["nonce"])
    if leading_zero_bits(prefix_hash) < 8:
        await refused(world, resign(flipped, world.prover), "work")
    else:  # the flipped nonce happens to be work too: then the binding catches it
        await refused(world, flipped, "binding")
    await world.verify(honest)
    # replayed: the identical set a second time
    await refused(world, honest, "work", "already used")


async def test_committed_work_is_refused_after_a_restart(tmp_path: Path,
                                                       plotted: Path) -> None:
    """Used work is replicated state: the issuance that used it commits it, and a restarted
    node, which remembers nothing it checked, still refuses it."""
    world = await make_world(tmp_path, plotted)
    csr = make_csr("replay.trust")
    honest = await world.proofs(csr)
    await world.verify(honest, csr)
    raise_refused(await world.replica.issue(csr, honest))
    proofs = parse_proofs(honest)
    digest = work_hash(work_prefix("issue", issue_digest(csr), key_id(proofs.requester_key),
                                   proofs.epoch), proofs.nonce)
    assert world.state.work_used(digest)
    checked_only = await world.proofs(b"never committed")
    await world.verify(checked_only, b"never committed")
    await world.close()  # the node restarts
    audit = AuditLog(tmp_path / "audit.log", clock=world.clock)
    state, beacon_store, _, verifier = open_stores(tmp_path, world.clock, world.keystore, audit)
    try:
        assert state.balance(world.prover.key_id) == 1000  # the stake survived too
        with pytest.raises(ProofInvalid, match="already used"):
            await verifier.verify("issue", issue_digest(csr), honest)
        # work that was only checked, never committed by a block, was never used
        await verifier.verify("issue", issue_digest(b"never committed"), checked_only)
        assert verifier.stats.space_verified == 1  # the caches did not survive: cold again
    finally:
        await verifier.close()
        state.close()
        beacon_store.close()
        audit.close()


async def test_work_another_validator_committed_is_refused_until_its_epoch_ends(
        world: World) -> None:
    """Work this verifier never saw, used by an executed issuance (checked by another
    validator), is refused here and by the state machine; once no epoch accepts it the
    state forgets it, and the epoch check refuses the set instead."""
    csr = make_csr("elsewhere.trust")
    honest = await world.proofs(csr)
    raise_refused(await world.replica.issue(csr, honest))
    await refused(world, honest, "work", "already used", csr)
    again = await world.replica.issue(csr, honest)
    assert not again.accepted and again.code == "proof_invalid"
    assert again.details["proof"] == "work" and "already used" in again.message
    proofs = parse_proofs(honest)
    digest = work_hash(work_prefix("issue", issue_digest(csr), key_id(proofs.requester_key),
                                   proofs.epoch), proofs.nonce)
    world.clock.now += EPOCH_LENGTH  # the next epoch: still accepted, still used
    await world.beacons.current()
    await world.replica.credit(world.prover.key_id, 1000)
    assert world.state.work_used(digest)
    world.clock.now += EPOCH_LENGTH  # two epochs on: dropped with the next block
    await world.beacons.current()
    await world.replica.credit(world.prover.key_id, 1000)
    assert not world.state.work_used(digest)
    await refused(world, honest, "time", "accepts epochs", csr)


async def test_refusals_are_audited(world: World) -> None:
    honest = await world.proofs()
    await refused(world, {**honest, "binding": flip(honest["binding"], 5)}, "binding")
    await refused(world, {**honest, "requester_key": b"k" * 5000}, "stake")
    await world.verify(honest)
    first, second = audit_records(world.directory / "audit.log", "consensus.proofs-rejected")
    assert first["proof"] == "binding" and first["op"] == "issue"
    assert first["request"] == issue_digest(b"csr").hex()
    assert first["requester"] == world.prover.key_id
    assert second["proof"] == "stake" and "requester" not in second  # an oversized key
    assert world.verifier.stats.rejected == 2 and world.verifier.stats.admitted == 1


async def test_concurrent_twins_only_one_admitted(world: World) -> None:
    import asyncio
    honest = await world.proofs()
    results = await asyncio.gather(*(world.verify(copy.deepcopy(honest)) for _ in range(5)),
                                   return_exceptions=True)
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, ProofInvalid) and r.details["proof"] == "work"
               for r in results if r is not None)


async def test_concurrent_twins_with_a_remembered_credential(world: World) -> None:
    """With the credential remembered, a check never waits: one replay check (before the
    binding) decides, and still only one twin is admitted."""
    import asyncio
    await world.verify(await world.proofs(b"first"), b"first")  # the credential, verified
    honest = await world.proofs(b"twins")
    results = await asyncio.gather(*(world.verify(copy.deepcopy(honest), b"twins")
                                     for _ in range(5)), return_exceptions=True)
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, ProofInvalid) and "already used" in r.message
               for r in results if r is not None)
    assert world.verifier.stats.time_verified == 1 and world.verifier.stats.time_cached == 1


async def test_stake_refusals(world: World) -> None:
    poor = stoq.Prover.open(world.prover.directory.parent / "poor")
    honest = await world.proofs()
    # a key without any stake signs a set built around this key's credentials
    theirs = rework({**honest, "requester_key": poor.spki})
    error = await refused(world, resign(theirs, poor), "stake", "at least 1000")
    assert error.details["stake"] == 0 and error.details["minimum"] == 1000
    await world.replica.credit(poor.key_id, 999)  # just below
    error = await refused(world, resign(theirs, poor), "stake", "holds 999")
    # not a key at all, or a kind of key we do not verify
    for junk in (b"\x30\x03\x02\x01\x00", ec.generate_private_key(ec.SECP521R1()).public_key()
                 .public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)):
        await world.replica.credit(hashlib.sha256(junk).hexdigest(), 5000)
        await refused(world, rework({**honest, "requester_key": junk}), "stake",
                      "requester_key")
    await world.verify(honest)


async def test_binding_refusals(world: World) -> None:
    honest = await world.proofs()
    # another key's signature
    intruder = stoq.Prover.open(world.prover.directory.parent / "intruder")
    await refused(world, resign(honest, intruder), "binding", "does not verify")
    # for another request: work re-solved for it, the binding still names the first
    await refused(world, rework(honest, b"second"), "binding", csr=b"second")
    # another epoch in the binding (the set says this epoch)
    proofs = parse_proofs(honest)
    statement = binding_statement(op="issue", request=issue_digest(b"csr"),
                                  epoch=proofs.epoch - 1, space=proofs.space.digest(),
                                  time=proofs.time.digest(), nonce=proofs.nonce)
    signed = sign_binding(world.prover.key, statement)
    await refused(world, {**honest, "binding": signed}, "binding")
    # signed for a revocation, presented for an issuance
    statement = binding_statement(op="revoke", request=issue_digest(b"csr"),
                                  epoch=proofs.epoch, space=proofs.space.digest(),
                                  time=proofs.time.digest(), nonce=proofs.nonce)
    signed = sign_binding(world.prover.key, statement)
    await refused(world, {**honest, "binding": signed}, "binding")
    # one bit flipped
    await refused(world, {**honest, "binding": flip(honest["binding"], 5)}, "binding")
    await world.verify(honest)


async def test_epoch_refusals(world: World) -> None:
    honest = await world.proofs()
    for epoch in (honest["epoch"] + 1, honest["epoch"] - 2, 0):
        await refused(world, rework({**honest, "epoch": epoch}), "time", "accepts epochs")
    # the previous epoch, which this node never made a beacon for
    await refused(world, rework({**honest, "epoch": honest["epoch"] - 1}), "time",
                  "has no beacon")


# --- shapes ------------------------------------------------------------------------------------


BAD_SHAPES: list[tuple[str, Callable[[dict[str, Any]], Any], str, str]] = [
    ("not a map", lambda p: [p], "binding", "proofs"),
    ("unknown key", lambda p: {**p, "extra": 1}, "binding", "proofs"),
    ("epoch text", lambda p: {**p, "epoch": "7"}, "time", "proofs.epoch"),
    ("epoch negative", lambda p: {**p, "epoch": -1}, "time", "proofs.epoch"),
    ("epoch float", lambda p: {**p, "epoch": 7.0}, "time", "proofs.epoch"),
    ("key text", lambda p: {**p, "requester_key": "abc"}, "stake", "proofs.requester_key"),
    ("key empty", lambda p: {**p, "requester_key": b""}, "stake", "proofs.requester_key"),
    ("key oversized", lambda p: {**p, "requester_key": b"k" * 5000}, "stake",
     "proofs.requester_key"),
    ("space not a map", lambda p: {**p, "space": b"x"}, "space", "proofs.space"),
    ("space unknown key", lambda p: {**p, "space": {**p["space"], "q": 1}}, "space",
     "proofs.space.q"),
    ("k text", lambda p: {**p, "space": {**p["space"], "k": "18"}}, "space", "proofs.space.k"),
    ("k bool", lambda p: {**p, "space": {**p["space"], "k": True}}, "space", "proofs.space.k"),
    ("k absurd", lambda p: {**p, "space": {**p["space"], "k": 10**9}}, "space",
     "proofs.space.k"),
    ("k small", lambda p: {**p, "space": {**p["space"], "k": 17}}, "space", "proofs.space.k"),
    ("index too big", lambda p: {**p, "space": {**p["space"], "index": 32}}, "space",
     "proofs.space.index"),
    ("plot id short", lambda p: {**p, "space": {**p["space"], "plot_id": b"\0" * 31}},
     "space", "proofs.space.plot_id"),
    ("proof truncated", lambda p: {**p, "space": {**p["space"],
                                                  "proof": p["space"]["proof"][:-1]}},
     "space", "proofs.space.proof"),
    ("proof oversized", lambda p: {**p, "space": {**p["space"], "proof": b"\0" * 100_000}},
     "space", "proofs.space.proof"),
    ("proof missing", lambda p: {**p, "space": {k: v for k, v in p["space"].items()
                                                if k != "proof"}},
     "space", "proofs.space.proof"),
    ("iterations negative", lambda p: {**p, "time": {**p["time"], "iterations": -5}}, "time",
     "proofs.time.iterations"),
    ("iterations zero", lambda p: {**p, "time": {**p["time"], "iterations": 0}}, "time",
     "proofs.time.iterations"),
    ("iterations absurd", lambda p: {**p, "time": {**p["time"], "iterations": 2**64 - 1}},
     "time", "proofs.time.iterations"),
    ("iterations float", lambda p: {**p, "time": {**p["time"], "iterations": 1000.0}}, "time",
     "proofs.time.iterations"),
    ("output truncated", lambda p: {**p, "time": {**p["time"], "output": p["time"]["output"]
                                                  [:50]}}, "time", "proofs.time.output"),
    ("output text", lambda p: {**p, "time": {**p["time"], "output": "ab"}}, "time",
     "proofs.time.output"),
    ("vdf proof oversized", lambda p: {**p, "time": {**p["time"], "proof": b"\1" * 1000}},
     "time", "proofs.time.proof"),
    ("work not a map", lambda p: {**p, "work": 5}, "work", "proofs.work"),
    ("nonce empty", lambda p: {**p, "work": {"nonce": b""}}, "work", "proofs.work.nonce"),
    ("nonce oversized", lambda p: {**p, "work": {"nonce": b"n" * 33}}, "work",
     "proofs.work.nonce"),
    ("nonce integer", lambda p: {**p, "work": {"nonce": 5}}, "work", "proofs.work.nonce"),
    ("binding text", lambda p: {**p, "binding": "sig"}, "binding", "proofs.binding"),
    ("binding oversized", lambda p: {**p, "binding": b"s" * 600}, "binding", "proofs.binding"),
]


@pytest.mark.parametrize(("name", "mutate", "proof", "field"), BAD_SHAPES,
                         ids=[c[0] for c in BAD_SHAPES])
async def test_bad_shapes(world: World, name: str, mutate: Callable[[dict[str, Any]], Any],
                          proof: str, field: str) -> None:
    honest = await world.proofs()
    error = await refused(world, mutate(copy.deepcopy(honest)), proof)
    assert error.details["field"] == field
    await world.verify(honest)  # the honest set was not used up by the bad one


async def test_garbage_forms_never_crash(world: World) -> None:
    """Random bytes where the VDF forms go: an answer each time, never a crash."""
    import random
    rng = random.Random(5)
    honest = await world.proofs()
    for i in range(40):
        forms = {"output": honest["time"]["output"], "proof": honest["time"]["proof"]}
        target = "output" if i % 2 else "proof"
        forms[target] = bytes(rng.randrange(256) for _ in range(VDF_FORM_SIZE))
        wire = resign({**honest, "time": {**honest["time"], **forms}}, world.prover)
        await refused(world, wire, "time")
    await world.verify(honest)


# --- pieces ---------------------------------------------------------------------------------------


def test_wire_round_trip_and_digests_are_deterministic(plotted: Path) -> None:
    prover = stoq.Prover.open(plotted)
    proofs = parse_proofs({
        "epoch": 5, "requester_key": prover.spki,
        "space": {"k": 18, "index": 3, "proof": b"p" * 144, "plot_id": b"i" * 32},
        "time": {"proof": b"q" * 100, "output": b"o" * 100, "iterations": 7},
        "work": {"nonce": b"n"}, "binding": b"b"})
    assert parse_proofs(proofs.to_wire()) == proofs
    assert proofs.space.digest() == hashlib.sha256(encode_deterministic(
        {"plot_id": b"i" * 32, "k": 18, "index": 3, "proof": b"p" * 144})).digest()
    assert isinstance(proofs.time, TimeProof)
    assert plot_id_for(prover.spki, 18) != plot_id_for(prover.spki, 19)


def test_binding_statement_vector() -> None:
    """The bytes a requester signs, pinned (spec/stoq.md §10.13 shows this example)."""
    statement = binding_statement(op="issue", request=bytes(range(32)), epoch=498775,
                                  space=b"\x11" * 32, time=b"\x22" * 32,
                                  nonce=bytes.fromhex("00000000000000ab"))
    assert statement.hex() == (
        "a7626f7065697373756563637478747472757374636861696e2d70726f6f6673"
        "2d76316474696d65582022222222222222222222222222222222222222222222"
        "222222222222222222226565706f63681a00079c57656e6f6e63654800000000"
        "000000ab65737061636558201111111111111111111111111111111111111111"
        "1111111111111111111111116772657175657374582000010203040506070809"
        "0a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")


def test_derivation_vectors_of_the_spec() -> None:
    """The example values of spec/stoq.md §17.3 (RFC 8032 TEST 1 key)."""
    from protocol.ops.consensus import space_challenge, vdf_challenge
    spki = bytes.fromhex("302a300506032b6570032100d75a980182b10ab7d54bfed3c964073a0ee172f3"
                         "daa62325af021a68f707511a")
    assert key_id(spki).hex() == \
        "06e3fd8fda29bb60ab59557de61edb0aecdb231134be30e75b455f8e1b792fa9"
    plot_id = plot_id_for(spki, 18)
    assert plot_id.hex() == "c0a32f99a963eeb96fb811b9ca8c296249dec8b52ef326317f412f5e6ae0d432"
    beacon = bytes(range(32))
    assert space_challenge(beacon, plot_id, 0).hex() == \
        "ae1381635056bd5ff9a4a030b8315649e12f954952bd2a7efa0dc06fbfe55c1a"
    assert vdf_challenge(beacon, 498775, spki).hex() == \
        "f0ef6e2f45ccb81ce43efbb371efe3d10cd3eefdc8905be1e5ad1f81a4543c9b"
    prefix = work_prefix("issue", bytes(32), key_id(spki), 498775)
    assert len(prefix) == 124 and prefix.hex() == (
        "a5626f7065697373756563637478727472757374636861696e2d776f726b2d7631636b657958"
        "2006e3fd8fda29bb60ab59557de61edb0aecdb231134be30e75b455f8e1b792fa96565706f63"
        "681a00079c576772657175657374582000000000000000000000000000000000000000000000"
        "00000000000000000000")


def test_work_solver_reaches_the_difficulty() -> None:
    prefix = work_prefix("revoke", b"\x01" * 32, b"\x02" * 32, 9)
    for difficulty in (0, 1, 12, 19):  # 19: several processes search
        nonce = stoq.solve_work(prefix, difficulty)
        assert leading_zero_bits(work_hash(prefix, nonce)) >= difficulty
    assert leading_zero_bits(b"\x00\x00\x01" + b"\xff" * 29) == 23
    assert leading_zero_bits(b"\x80" + bytes(31)) == 0


async def test_beacons_are_chained_signed_and_audited(world: World, tmp_path: Path) -> None:
    first = await world.beacons.current()
    assert await world.beacons.current() == first  # one per epoch
    world.clock.now += 3 * EPOCH_LENGTH
    second = await world.beacons.current()
    assert second.epoch == first.epoch + 3 and second.previous == first.value
    assert second.start == second.epoch * EPOCH_LENGTH
    key = serialization.load_der_public_key(second.public_key)
    statement = beacon_statement(epoch=second.epoch, start=second.start, value=second.value,
                                 previous=second.previous)
    assert verify_signature(key, second.signature, statement)
    with pytest.raises(ValueError, match="not begun"):
        await world.beacons.ensure(second.epoch + 1)
    # kept: a node that restarts serves the same beacons and makes none again
    world.beacon_store.close()
    world.beacon_store = BeaconStore(tmp_path / "consensus" / "beacons.sqlite3")
    again = BeaconChain(store=world.beacon_store, signer=world.beacons.signer,
                        epoch_length=EPOCH_LENGTH, audit=world.audit.append_async,
                        clock=world.clock)
    assert again.get(first.epoch) == first and await again.current() == second
    world.audit.close()
    log = (tmp_path / "audit.log").read_text()
    assert log.count('"consensus.beacon"') == 2
    assert verify_log(tmp_path / "audit.log").ok
    world.audit = AuditLog(tmp_path / "audit2.log")  # for the fixture's teardown


async def test_stake_is_replicated_state_and_survives_a_restart(tmp_path: Path) -> None:
    """Genesis stake, then a committed credit; after a restart the state holds the
    balance, the audit log its history, and an edit behind the blocks' back is caught."""
    clock = Clock(START)
    keystore = open_keystore(provider="software", data_dir=tmp_path)
    path = tmp_path / "state" / "state.sqlite3"

    async def open_replica() -> tuple[StateDatabase, AuditLog, Replica]:
        state = StateDatabase(path)
        audit = AuditLog(tmp_path / "audit.log", clock=clock)
        replica = Replica(tmp_path, state, keystore, audit, clock)
        await replica.machine.open({"ab" * 32: 1500})  # applied to an empty state only
        return state, audit, replica

    async def close(state: StateDatabase, audit: AuditLog, replica: Replica) -> None:
        await replica.close()
        await state.drain()
        state.close()
        audit.close()

    state, audit, replica = await open_replica()
    assert state.balance("ab" * 32) == 1500 and state.height() == 0
    clock.now += 10
    await replica.credit("ab" * 32, 900, "faucet")
    await close(state, audit, replica)
    state, audit, replica = await open_replica()
    try:
        assert state.balance("ab" * 32) == 900 and state.balance("cd" * 32) == 0
        assert state.known("ab" * 32) and not state.known("cd" * 32)
        assert replica.machine.height == 1 and replica.machine.corrupt is None
        history = audit_records(tmp_path / "audit.log", "consensus.stake-changed")
        assert [(r["before"], r["after"], r["reason"]) for r in history] == [
            (0, 1500, "genesis"), (1500, 900, "faucet")]
    finally:
        await close(state, audit, replica)
    with sqlite3.connect(path) as conn:  # stake raised outside the blocks
        conn.execute("UPDATE stake SET amount=5000 WHERE key_id=?", ("ab" * 32,))
    state, audit, replica = await open_replica()
    try:
        assert replica.machine.corrupt is not None
        assert "does not match its hash" in replica.machine.corrupt
    finally:
        await close(state, audit, replica)


def test_the_requester_key_is_private(tmp_path: Path) -> None:
    """A new proofs directory is 0700 and its requester key 0600, whatever the umask;
    an existing directory the user chose is left as it is."""
    import os
    import stat
    previous = os.umask(0o022)
    try:
        directory = tmp_path / "home" / "trustchain-proofs"
        prover = stoq.Prover.open(directory)
        again = stoq.Prover.open(directory)
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o755)
        stoq.Prover.open(shared)
    finally:
        os.umask(previous)
    assert again.key_id == prover.key_id
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "requester.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((directory.parent).stat().st_mode) == 0o755
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    assert stat.S_IMODE((shared / "requester.key").stat().st_mode) == 0o600


def test_the_proofs_directory_is_ignored_by_git() -> None:
    """The project's .gitignore keeps the requester's key out of commits."""
    import subprocess
    root = Path(__file__).resolve().parents[2]
    paths = ["trustchain-proofs/requester.key", "trustchain-data/keys/root.pem"]
    ignored = subprocess.run(["git", "-C", str(root), "check-ignore", "--no-index", *paths],
                             capture_output=True, text=True, check=False)
    if "not a git repository" in ignored.stderr:
        pytest.skip("not a git checkout")
    assert ignored.stdout.split() == paths, ignored.stderr
    rules = (root / ".gitignore").read_text().splitlines()
    assert "trustchain-proofs/" in rules
