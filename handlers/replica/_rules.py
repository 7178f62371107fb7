"""The rules a validator applies before it votes for a block, and after it is committed.

:class:`CaRules` is the consensus driver's :class:`handlers.consensus.Rules`:

- :meth:`CaRules.check` is asked once per decision, before any vote for a
  block that holds it, and its verdict is kept: so it checks only what cannot
  change with the state: the seal (an active validator's signature), the
  shape, the CSR against the naming policy, the four proofs bound to the
  request, a node certificate's names against the validator set, announced
  keys chaining to the cluster root, a submitted chain to an accepted root. A
  block with a decision that fails is refused (the validator prevotes nil).
- :meth:`CaRules.execute` hands a committed block to the state machine
  (:mod:`._machine`), which decides what depends on the state (the
  precertificate against its issuer's announced intermediate, who holds a
  name, whether a serial or some work was used).
- :meth:`CaRules.extension` is the precommit extension: cosignatures of the
  CT checkpoints in the block.

A refused decision is counted against the validator that sealed it
(``consensus.status``); one whose seal does not open, against the validator that
gossiped it.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from protocol import ProofInvalid, TrustChainError, revocation_statement
from protocol.ct_structs import StructureError, check_sct_list
from protocol.decisions import (
    Checkpoint,
    CompactCertificate,
    DecisionError,
    Issue,
    LogChain,
    Misissued,
    NodeCertificate,
    Register,
    Revoke,
    SignedCertificate,
    StakeCredit,
    ValidatorKeys,
    parse,
)
from protocol.ops.consensus import Operation

from ..ca import NamingPolicy, check_request
from ..consensus import Executed, SealError
from ..consensus._cosign import checkpoint_body, precommit_extension
from ..consensus._sealed import SealOpener
from ..consensus.bft import Block, Commit, ValidatorSet
from ..ct import ChainValidator
from ._machine import MAX_DECISION_AGE_MS, CaStateMachine
from ._read import remember

Verify = Callable[[Operation, bytes, Any], Awaitable[Any]]
"""``async (operation, request_digest, proofs)``: raises ``ProofInvalid``."""


class CaRules:
    """Checks decisions before the vote; executes committed blocks.

    :param verify_proofs: the node's four-proof verifier.
    :param root: the cluster's root certificate (announced intermediates chain to it).
    :param node_names: validator id -> the names its own TLS certificate may carry.
    :param seals: opens the decisions' seals (it remembers verified batch signatures).
    :param cosign: signs this validator's checkpoint cosignatures (None: an observer).
    :param on_block: called after each block is executed (the cluster's epoch beacons).
    """

    def __init__(self, *, machine: CaStateMachine, policy: NamingPolicy,
                 verify_proofs: Verify, chains: ChainValidator, root: x509.Certificate,
                 node_names: Mapping[str, frozenset[str]], lifetime: float, backdate: float,
                 development: bool, minimum_stake: int, seals: SealOpener,
                 cosign: Callable[[bytes], bytes] | None = None,
                 on_block: Callable[[Block], Awaitable[None]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.machine = machine
        self.policy = policy
        self.verify_proofs = verify_proofs
        self.chains = chains
        self.root = root
        self.node_names = dict(node_names)
        self.lifetime = lifetime
        self.backdate = backdate
        self.development = development
        self.minimum_stake = minimum_stake
        self.seals = seals
        self.cosign = cosign
        self.on_block = on_block
        self.clock = clock

    @property
    def state_hash(self) -> bytes:
        return self.machine.state_hash

    @property
    def checkpoints(self) -> dict[str, tuple[int, int, int]]:
        return self.machine.checkpoints

    # --- before the vote --------------------------------------------------------------

    async def check(self, decision: bytes, validators: ValidatorSet,
                    sender: str | None = None) -> str | None:
        """None if ``decision`` may be committed, else why not (counted against the
        validator that sealed it; a seal that does not open, against ``sender``, the
        validator that gossiped it: a validator gossips only its own decisions)."""
        try:
            sealed = self.seals.open(decision, validators)
        except SealError as exc:
            if sender is not None:
                self.machine.refusals[sender] = self.machine.refusals.get(sender, 0) + 1
            return str(exc)
        try:
            parsed = parse(sealed.body)
            remember(decision, sealed.entry, parsed)
            reason = await self._check(parsed, sealed.entry)
        except DecisionError as exc:
            reason = str(exc)
        except ProofInvalid as exc:
            reason = f"proof {exc.details.get('proof', '?')} invalid: {exc.message}"
        except TrustChainError as exc:
            reason = f"{exc.code.value}: {exc.message}"
        if reason is not None:
            refusals = self.machine.refusals
            refusals[sealed.entry] = refusals.get(sealed.entry, 0) + 1
        return reason

    async def _check(self, decision: Any, entry: str) -> str | None:
        if isinstance(decision, Issue | NodeCertificate | Revoke | Register | LogChain
                      | SignedCertificate | CompactCertificate | ValidatorKeys | Misissued
                      | StakeCredit | Checkpoint) and abs(self.clock() * 1000 - decision.at_ms) \
                > MAX_DECISION_AGE_MS // 2:
            return "it is stamped more than 5 minutes from this validator's clock"
        if isinstance(decision, Issue):
            check_request(decision.csr, self.policy)
            await self.verify_proofs("issue", hashlib.sha256(decision.csr).digest(),
                                     decision.proofs)
            return None  # the precertificate: when executed (it needs the issuer's keys)
        if isinstance(decision, NodeCertificate):
            request = check_request(decision.csr, self.policy)
            allowed = self.node_names.get(entry, frozenset())
            outside = [n for n in request.names if n not in allowed]
            if outside:
                return (f"node-certificate: {', '.join(outside)} is not a name of validator "
                        f"{entry} (consensus.validators)")
            return None
        if isinstance(decision, Revoke):
            statement = revocation_statement(decision.serial, decision.reason, decision.time)
            await self.verify_proofs("revoke", hashlib.sha256(statement).digest(),
                                     decision.proofs)
            return None
        if isinstance(decision, LogChain):
            self.chains.check(list(decision.chain), precert=decision.precert)
            return None
        if isinstance(decision, ValidatorKeys):
            return self._check_keys(decision)
        if isinstance(decision, SignedCertificate | Misissued):
            try:
                x509.load_der_x509_certificate(decision.certificate)
            except ValueError:
                return f"{decision.KIND}: not a DER certificate"
            return None
        if isinstance(decision, CompactCertificate):
            try:  # the signature needs the committed precertificate: when executed
                check_sct_list(decision.sct_list)
            except StructureError as exc:
                return f"certificate: the SCT list cannot be read: {exc}"
            return None
        if isinstance(decision, StakeCredit):
            if not self.development:
                return "stake credits (the faucet) exist in development mode only"
            if decision.amount != self.minimum_stake or decision.reason != "faucet":
                return "a faucet credit is exactly the minimum stake"
            return None
        if isinstance(decision, Checkpoint):
            return self._check_checkpoint(decision)
        return None  # Register: everything it needs is state (checked when executed)

    def _check_keys(self, decision: ValidatorKeys) -> str | None:
        for der in decision.intermediates:
            try:
                cert = x509.load_der_x509_certificate(der)
                cert.verify_directly_issued_by(self.root)
                constraints = cert.extensions.get_extension_for_class(
                    x509.BasicConstraints).value
            except Exception:
                return "keys: an intermediate is not a CA certificate issued by the root"
            if not constraints.ca:
                return "keys: an intermediate is not a CA certificate"
        for _, spki in decision.ct_logs:
            try:
                serialization.load_der_public_key(spki)
            except ValueError:
                return "keys: a CT log key is not a DER public key"
        for der in decision.admins:
            try:
                x509.load_der_x509_certificate(der)
            except ValueError:
                return "keys: an administrator certificate is not a DER certificate"
        return None

    def _check_checkpoint(self, decision: Checkpoint) -> str | None:
        try:
            text = checkpoint_body(decision.note)
        except ValueError as exc:
            return f"checkpoint: {exc}"
        root = base64.b64encode(decision.root).decode()
        if not text.startswith(f"{decision.origin}\n{decision.size}\n{root}\n"):
            return "checkpoint: the note does not match its origin, size and root"
        committed = self.checkpoints.get(decision.origin)
        if committed is not None and decision.size < committed[0]:
            return (f"checkpoint: {decision.origin} is already committed at size "
                    f"{committed[0]}; a checkpoint never goes back")
        return None

    # --- after the commit -------------------------------------------------------------

    @property
    def executed_height(self) -> int:
        return self.machine.height

    def isolated(self) -> frozenset[str]:
        return self.machine.isolated()

    async def execute(self, block: Block, commit: Commit) -> Executed:
        executed = await self.machine.execute(block)
        if self.on_block is not None:
            await self.on_block(block)
        return executed

    def extension(self, block: Block) -> bytes:
        """Cosignatures of the block's CT checkpoints (c2sp.org/tlog-cosignature)."""
        return precommit_extension(block, self.cosign) if self.cosign is not None else b""
