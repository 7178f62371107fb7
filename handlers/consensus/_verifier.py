"""Verification of the four-proof set of one CA operation.

``ProofVerifier.verify(op, request, proofs)`` checks, in this order, and stops
at the first failure (each a ``proof_invalid`` naming the proof):

1. the shape of the set (``protocol.ops.consensus.parse_proofs``);
2. the epoch: the current one or the one before, with a beacon   -> ``time``
3. work: SHA-256(prefix || nonce) has the required leading zero bits -> ``work``
4. replay: no admitted set had the same work hash                    -> ``work``
5. stake: the requester key holds ``minimum_stake``                  -> ``stake``
6. binding: the key's signature over request, epoch and proofs       -> ``binding``
7. space: plot id bound to the key, a chiapos proof for the epoch's
   challenge                                                         -> ``space``
8. time: a chiavdf Wesolowski proof on the key's discriminant for the
   epoch, at least ``vdf_iterations``                                -> ``time``

The cheap checks come first, so that a request without valid work, stake and
signature never costs a proof verification. Space and time are *epoch
credentials*: each distinct credential is verified in full once, then
remembered (by the key, the epoch and the SHA-256 of its deterministic
encoding) until the epoch is no longer accepted. Work and the binding are
checked on every request. New VDFs are verified in worker processes
(:mod:`._workers`: chiavdf holds the GIL for the 15-40 ms a new discriminant and
a verification take), so they neither stall the event loop nor take it down
if they fail.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from protocol import ProofInvalid
from protocol.ops.consensus import (
    MAX_KEY_SIZE,
    Operation,
    ProofParams,
    ProofSet,
    binding_statement,
    key_id,
    leading_zero_bits,
    parse_proofs,
    plot_id_for,
    space_challenge,
    vdf_challenge,
    work_hash,
    work_prefix,
)
from store import verify_signature

from . import _native
from ._beacon import BeaconChain
from ._workers import VdfWorkers, WorkerFailed

log = logging.getLogger("trustchain.consensus")

PUBLIC_KEY_CACHE = 100_000
"""Parsed requester keys kept (by their DER), so a warm request parses none."""


@dataclass
class VerifierStats:
    """Counters since the verifier was made (``node.services["proofs"]``)."""

    admitted: int = 0
    rejected: int = 0
    space_verified: int = 0
    """Space proofs verified in full (cache misses)."""
    space_cached: int = 0
    time_verified: int = 0
    """VDFs verified in full (cache misses)."""
    time_cached: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _fail(proof: str, message: str, **details: Any) -> ProofInvalid:
    return ProofInvalid(f"{proof}: {message}", proof=proof, **details)


class WorkLedger(Protocol):
    """What the verifier reads of the replicated state: stake, and work already used."""

    def balance(self, key_id: str) -> int: ...

    def work_used(self, digest: bytes) -> bool: ...


MAX_CHECKED_WORK = 100_000
"""Accepted work hashes kept in memory before those of past epochs are dropped."""


class ProofVerifier:
    """Verifies proof sets against the ledger, the beacons and ``params``.

    :param workers: processes for new VDFs; 0 verifies them on the caller's thread.
    """

    def __init__(self, *, params: ProofParams, ledger: WorkLedger, beacons: BeaconChain,
                 workers: int = 1,
                 audit: Callable[[str, dict[str, Any]], Awaitable[Any]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.params = params
        self.ledger = ledger
        self._audit = audit
        self.beacons = beacons
        self.clock = clock
        self.workers = workers
        self.stats = VerifierStats()
        self._target_bits = params.minimum_work_difficulty
        self._keys: dict[bytes, Any] = {}
        # epoch -> verified credentials (key id + digest); only accepted epochs are kept
        self._space_ok: dict[int, set[bytes]] = {}
        self._time_ok: dict[int, set[bytes]] = {}
        self._in_flight: dict[bytes, asyncio.Future[str | None]] = {}
        self._checked: dict[bytes, int] = {}
        """Work hash -> epoch of every proof set this verifier accepted: a second
        request with the same work is refused before its first is even committed."""
        self._workers = VdfWorkers(workers) if workers > 0 else None

    # --- the check ----------------------------------------------------------------

    def accepted_epochs(self) -> tuple[int, int]:
        """The epochs whose proof sets are accepted now: the previous and the current."""
        current = self.beacons.current_epoch()
        return current - 1, current

    async def verify(self, op: Operation, request: bytes, raw: Any) -> ProofSet:
        """Verify the proof set ``raw`` for operation ``op`` on the request digest ``request``.

        On success the set's work is recorded as used: the same set is refused
        from then on.

        :raises ProofInvalid: with ``proof`` naming the failed proof.
        """
        try:
            proofs = await self._verify(op, request, raw)
        except ProofInvalid as exc:
            self.stats.rejected += 1
            if self._audit is not None:
                record: dict[str, Any] = {"op": op, "proof": exc.details.get("proof", ""),
                                          "reason": exc.message, "request": request.hex()}
                key = raw.get("requester_key") if isinstance(raw, dict) else None
                if isinstance(key, bytes) and len(key) <= MAX_KEY_SIZE:
                    record["requester"] = hashlib.sha256(key).hexdigest()
                await self._audit("consensus.proofs-rejected", record)
            raise
        self.stats.admitted += 1
        return proofs

    async def _verify(self, op: Operation, request: bytes, raw: Any) -> ProofSet:
        proofs = parse_proofs(raw)
        epoch = proofs.epoch
        previous, current = self.accepted_epochs()
        if epoch not in (previous, current):
            raise _fail("time", f"the proofs are for epoch {epoch}; this node accepts epochs "
                                f"{previous} and {current} (ask consensus.beacon)",
                        field="proofs.epoch")
        beacon = self.beacons.get(epoch)
        if beacon is None:
            raise _fail("time", f"epoch {epoch} has no beacon on this node (ask "
                                "consensus.beacon)", field="proofs.epoch")
        kid = key_id(proofs.requester_key)

        digest = work_hash(work_prefix(op, request, kid, epoch), proofs.nonce)
        if leading_zero_bits(digest) < self._target_bits:
            raise _fail("work", f"the work hash has {leading_zero_bits(digest)} leading zero "
                                f"bits; {self._target_bits} are required (the nonce must be "
                                "found for this request, key and epoch)",
                        field="proofs.work.nonce")
        if self._used(digest):
            raise _fail("work", "this proof of work was already used (a replayed request); "
                                "every request needs fresh work", field="proofs.work.nonce")

        stake = self.ledger.balance(kid.hex())
        if stake < self.params.minimum_stake:
            raise _fail("stake", f"key {kid.hex()} holds {stake}; at least "
                                 f"{self.params.minimum_stake} is required",
                        field="proofs.requester_key", stake=stake,
                        minimum=self.params.minimum_stake)

        key = self._public_key(proofs.requester_key)
        space_digest = proofs.space.digest()
        time_digest = proofs.time.digest()
        statement = binding_statement(op=op, request=request, epoch=epoch, space=space_digest,
                                      time=time_digest, nonce=proofs.nonce)
        if not verify_signature(key, proofs.binding, statement):
            raise _fail("binding", "the binding signature does not verify with requester_key "
                                   "over this request, epoch and these proofs",
                        field="proofs.binding")

        self._check_space(proofs, kid, beacon.value, space_digest)
        waited = await self._check_time(proofs, kid, beacon.value, time_digest)

        if waited and self._used(digest):  # a concurrent twin passed while we waited
            raise _fail("work", "this proof of work was already used (a replayed request); "
                                "every request needs fresh work", field="proofs.work.nonce")
        self._checked[digest] = epoch
        if len(self._checked) > MAX_CHECKED_WORK:
            oldest = previous - 1
            self._checked = {d: e for d, e in self._checked.items() if e > oldest}
        return proofs

    def _used(self, digest: bytes) -> bool:
        """Committed (the ledger) or already checked here (a twin in flight)."""
        return digest in self._checked or self.ledger.work_used(digest)

    def _public_key(self, der: bytes) -> Any:
        key = self._keys.get(der)
        if key is not None:
            return key
        try:
            key = serialization.load_der_public_key(der)
        except (ValueError, TypeError) as exc:
            raise _fail("stake", "requester_key is not a DER SubjectPublicKeyInfo",
                        field="proofs.requester_key") from exc
        supported = isinstance(key, ed25519.Ed25519PublicKey) or (
            isinstance(key, ec.EllipticCurvePublicKey)
            and isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1))
        if not supported:
            raise _fail("stake", "requester_key must be an Ed25519, P-256 or P-384 key",
                        field="proofs.requester_key")
        if len(self._keys) >= PUBLIC_KEY_CACHE:
            self._keys.clear()
        self._keys[der] = key
        return key

    # --- epoch credentials -------------------------------------------------------------

    def _remember(self, table: dict[int, set[bytes]], epoch: int) -> set[bytes]:
        known = table.get(epoch)
        if known is None:
            oldest = self.accepted_epochs()[0]
            for stale in [e for e in table if e < oldest]:
                del table[stale]
            known = table[epoch] = set()
        return known

    def _check_space(self, proofs: ProofSet, kid: bytes, beacon: bytes, digest: bytes) -> None:
        known = self._remember(self._space_ok, proofs.epoch)
        credential = kid + digest
        if credential in known:
            self.stats.space_cached += 1
            return
        space = proofs.space
        if space.plot_id != plot_id_for(proofs.requester_key, space.k):
            raise _fail("space", "the plot id is not bound to requester_key (it must be "
                                 "plot_id_for(key, k))", field="proofs.space.plot_id")
        if space.k < self.params.plot_size:
            raise _fail("space", f"plots of size k={space.k} are too small; this node "
                                 f"requires k >= {self.params.plot_size}",
                        field="proofs.space.k")
        challenge = space_challenge(beacon, space.plot_id, space.index)
        if not _native.verify_space(space.plot_id, space.k, challenge, space.proof):
            raise _fail("space", f"the proof does not verify for challenge {space.index} of "
                                 f"epoch {proofs.epoch} in this plot",
                        field="proofs.space.proof")
        self.stats.space_verified += 1
        known.add(credential)

    async def _check_time(self, proofs: ProofSet, kid: bytes, beacon: bytes,
                          digest: bytes) -> bool:
        """Verify (or find remembered) the time proof; whether it waited for a VDF check.

        A remembered credential returns without suspending: nothing else ran since the
        caller's replay check, so only a wait calls for another one."""
        known = self._remember(self._time_ok, proofs.epoch)
        credential = kid + digest
        if credential in known:
            self.stats.time_cached += 1
            return False
        vdf = proofs.time
        if vdf.iterations < self.params.vdf_iterations:
            raise _fail("time", f"{vdf.iterations} VDF iterations are too few; this node "
                                f"requires at least {self.params.vdf_iterations}",
                        field="proofs.time.iterations")
        pending = self._in_flight.get(credential)
        if pending is None:
            seed = vdf_challenge(beacon, proofs.epoch, proofs.requester_key)
            pending = asyncio.ensure_future(self._verify_vdf(seed, vdf.iterations, vdf.output,
                                                             vdf.proof))
            self._in_flight[credential] = pending
            pending.add_done_callback(lambda _: self._in_flight.pop(credential, None))
        problem = await asyncio.shield(pending)
        if problem is not None:
            raise _fail("time", problem, field="proofs.time")
        if credential in known:  # a concurrent request for the same credential won
            self.stats.time_cached += 1
        else:
            self.stats.time_verified += 1
            known.add(credential)
        return True

    async def _verify_vdf(self, seed: bytes, iterations: int, output: bytes,
                          proof: bytes) -> str | None:
        if self._workers is None:
            return _native.verify_time(seed, iterations, output, proof)
        try:
            return await self._workers.verify_time(seed, iterations, output, proof)
        except WorkerFailed as exc:
            log.error("VDF verification failed in its worker: %s", exc)
            return "the VDF verifier failed on this input"

    @property
    def worker_restarts(self) -> int:
        return self._workers.restarts if self._workers is not None else 0

    async def warm_up(self) -> None:
        """Start the worker processes now instead of at the first new VDF."""
        if self._workers is not None:
            await self._workers.warm_up()

    async def close(self) -> None:
        if self._workers is not None:
            await self._workers.close()
