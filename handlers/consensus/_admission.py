"""Four-proof admission: the :class:`handlers.ca.Admission` every CA operation passes."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from protocol import Internal, ProofInvalid
from protocol.ops.consensus import MAX_KEY_SIZE, Operation

from ..ca import Admitted, Decision
from ._decisions import derive_serial, seal
from ._driver import ConsensusChain
from ._verifier import ProofVerifier

Audit = Callable[[str, dict[str, Any]], Awaitable[Any]]


class FourProofAdmission:
    """Admits a client's decision only with a valid four-proof set bound to its request.

    The node's own requests (``Decision.internal``: its TLS certificate, which
    the rotator asks for in-process, for the names in the node's configuration)
    carry no client proofs: they cannot arrive over STOQ, where ``ca.issue``
    always names the peer as the requester, and they are admitted as
    ``"node"``. Every refusal is recorded in the audit log
    (``consensus.proofs-rejected``) with the proof that failed.

    :param audit: ``async (kind, data)``, returns once the record is durable.
    """

    name = "four-proof"

    def __init__(self, *, verifier: ProofVerifier, audit: Audit) -> None:
        self.verifier = verifier
        self._audit = audit
        self.internal = 0
        """Decisions admitted as the node's own."""

    async def admit(self, decision: Decision, proofs: dict[str, Any] | None) -> Admitted:
        """Admit ``decision`` or raise ``ProofInvalid`` naming the failed proof."""
        digest = decision.digest()
        if decision.internal:
            self.internal += 1
            return Admitted(decision_digest=digest, admission="node")
        if decision.kind not in ("issue", "revoke") or len(decision.request) != 32:
            raise Internal(f"admission: a {decision.kind!r} decision without a request digest")
        op: Operation = "issue" if decision.kind == "issue" else "revoke"
        try:
            await self.verifier.verify(op, decision.request, proofs)
        except ProofInvalid as exc:
            record: dict[str, Any] = {"op": op, "proof": exc.details.get("proof", ""),
                                      "reason": exc.message, "decision": digest.hex()}
            key = proofs.get("requester_key") if isinstance(proofs, dict) else None
            if isinstance(key, bytes) and len(key) <= MAX_KEY_SIZE:
                record["requester"] = hashlib.sha256(key).hexdigest()
            await self._audit("consensus.proofs-rejected", record)
            raise
        return Admitted(decision_digest=digest, admission=self.name)


class ConsensusAdmission:
    """Admits a decision once the validators have committed it in a block.

    The four proofs are checked here first (:class:`FourProofAdmission`), so a
    bad request fails fast with ``proof_invalid`` and never reaches the
    cluster; the decision, sealed with this node's validator key, then waits
    for a block. The committed block fixes the certificate's serial and
    validity (:func:`._decisions.derive_serial`), so that every validator knows
    what this node may sign.
    """

    name = "consensus"

    def __init__(self, *, local: FourProofAdmission, chain: ConsensusChain, entry: str,
                 sign: Callable[[bytes], bytes], timeout: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.local = local
        self.chain = chain
        self.entry = entry
        self.sign = sign
        self.timeout = timeout
        self.clock = clock

    def _body(self, decision: Decision, proofs: dict[str, Any] | None) -> dict[str, Any]:
        at_ms = int(self.clock() * 1000)
        if decision.kind == "issue":
            return {"kind": "issue", "csr": decision.material["csr"],
                    "proofs": None if decision.internal else proofs,
                    "internal": decision.internal, "at_ms": at_ms}
        if decision.kind == "revoke":
            return {"kind": "revoke", "serial": decision.subject["serial"],
                    "request": decision.request, "proofs": proofs, "at_ms": at_ms}
        raise Internal(f"admission: no consensus form for a {decision.kind!r} decision")

    async def admit(self, decision: Decision, proofs: dict[str, Any] | None) -> Admitted:
        """Check the proofs, then wait for the commit (``consensus_rejected`` / ``timeout``)."""
        await self.local.admit(decision, proofs)
        sealed = seal(self._body(decision, proofs), self.entry, self.sign)
        committed = await self.chain.submit(sealed, checked=True, timeout=self.timeout)
        return Admitted(decision_digest=decision.digest(), admission=self.name,
                        block_hash=committed.block_hash,
                        block_height=committed.block.height,
                        serial=derive_serial(committed.block_hash, committed.index),
                        decided_at=committed.block.time_ms // 1000,
                        signatures=committed.signatures())
