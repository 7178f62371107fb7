"""CA decisions as the validators see them: sealed by the entry node, checked by everyone.

A decision travels as deterministic CBOR::

    {"body": bstr, "entry": validator-id, "signature": Ed25519 over the body}

where ``body`` is one of

- ``{"kind": "issue", "csr": DER, "proofs": proof-set / null, "internal": bool,
  "at_ms": uint}`` — a certificate; ``internal`` marks the entry node's own TLS
  certificate, which carries no client proofs (the entry's signature answers for it);
- ``{"kind": "revoke", "serial": tstr, "request": bstr32, "proofs": proof-set,
  "at_ms": uint}`` — a revocation, its proofs bound to the revocation statement;
- ``{"kind": "stake", "key_id": tstr, "amount": uint, "reason": "faucet", "at_ms": uint}``
  — a development faucet credit;
- ``{"kind": "checkpoint", "origin": tstr, "size": uint, "root": bstr32, "note": tstr,
  "at_ms": uint}`` — the entry node's CT log checkpoint (its signed note), which
  every precommitting validator cosigns (:mod:`._cosign`).

Every validator checks a decision before voting for a block that holds it (the
entry node's signature, the CSR against the naming policy, the four proofs),
and executes committed ones the same way. The certificate a committed issuance
yields is fixed by the block: serial :func:`derive_serial`, validity from the
block time; the entry node signs exactly that, and anyone holding the chain can
check it (:func:`matches_decision`).
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from protocol import ProofInvalid, TrustChainError, decode_item, encode_deterministic
from protocol.ops.consensus import Operation

from ._cosign import checkpoint_body, precommit_extension
from .bft import Block, Commit, ValidatorSet

log = logging.getLogger("trustchain.consensus")

_SERIAL_CONTEXT = b"trustchain-serial-v1"


class DecisionError(ValueError):
    """A decision that is malformed or not sealed by a validator."""


@dataclass(frozen=True)
class SealedDecision:
    body: dict[str, Any]
    entry: str
    raw_body: bytes

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", ""))


def seal(body: dict[str, Any], entry: str, sign: Callable[[bytes], bytes]) -> bytes:
    """``body`` sealed by the entry validator ``entry``."""
    raw = encode_deterministic(body)
    return encode_deterministic({"body": raw, "entry": entry, "signature": sign(raw)})


def open_sealed(decision: bytes, validators: ValidatorSet) -> SealedDecision:
    """The decision's body if an active validator sealed it; :class:`DecisionError` if not."""
    try:
        item = decode_item(decision)
        raw, entry, signature = item["body"], item["entry"], item["signature"]
        body = decode_item(raw)
    except Exception:
        raise DecisionError("not a sealed decision") from None
    if not (isinstance(raw, bytes) and isinstance(entry, str) and isinstance(signature, bytes)
            and isinstance(body, dict)):
        raise DecisionError("not a sealed decision")
    validator = validators.by_id.get(entry)
    if validator is None or validator.power == 0:
        raise DecisionError(f"{entry!r} is not an active validator")
    if not validator.verify(signature, raw):
        raise DecisionError("the entry validator's signature does not verify")
    return SealedDecision(body=body, entry=entry, raw_body=raw)


def derive_serial(block_id: bytes, index: int) -> int:
    """The serial number of the certificate issued by decision ``index`` of a block.

    128 bits from the block id, unknown to anyone before the block is committed
    (more than the 64 random bits CA/B BR 7.1 asks), with the top bit set like
    :func:`handlers.ca._x509.new_serial`, so every serial has 32 hex digits.
    """
    digest = hashlib.sha256(_SERIAL_CONTEXT + block_id + index.to_bytes(4, "big")).digest()
    return int.from_bytes(digest[:16], "big") | (1 << 127)


def issued_window(block: Block, *, validity: float, backdate: float) -> tuple[float, float]:
    """``(not_before, not_after)`` of a certificate from ``block``: its time, back-dated."""
    now = block.time_ms // 1000
    return float(now - int(backdate)), float(now + int(validity))


def matches_decision(certificate: x509.Certificate, block: Block, index: int, *,
                     validity: float, backdate: float) -> str | None:
    """None if ``certificate`` is what decision ``index`` of ``block`` allows, else why not.

    Checks the serial, validity window and subject key; names are those of the
    committed CSR. This is how a validator proves a signer issued only what
    was committed.
    """
    try:
        body = decode_item(decode_item(block.decisions[index])["body"])
    except (IndexError, KeyError, TypeError, ValueError):
        return "no such decision"
    if body.get("kind") != "issue":
        return "the decision is not an issuance"
    if certificate.serial_number != derive_serial(block.id, index):
        return "the serial is not the one the block fixes"
    not_before, not_after = issued_window(block, validity=validity, backdate=backdate)
    if (int(certificate.not_valid_before_utc.timestamp()) != int(not_before)
            or int(certificate.not_valid_after_utc.timestamp()) > int(not_after)):
        return "the validity window is not the one the block fixes"
    csr = x509.load_der_x509_csr(body["csr"])
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(*spki) != csr.public_key().public_bytes(*spki):
        return "the subject key is not the committed CSR's"
    return None


Verify = Callable[[Operation, bytes, Any], Awaitable[Any]]
"""``async (operation, request_digest, proofs)``: raises ``ProofInvalid``."""


class CaRules:
    """:class:`handlers.consensus.Rules` for CA decisions.

    :param check_csr: raises ``TrustChainError`` unless the CSR passes the naming policy.
    :param verify_proofs: the node's four-proof verifier.
    :param set_stake: ``async (key_id, amount, reason)``, applies a committed credit.
    """

    def __init__(self, *, check_csr: Callable[[bytes], Any], verify_proofs: Verify,
                 set_stake: Callable[[str, int, str], Awaitable[Any]], development: bool,
                 minimum_stake: int,
                 on_block: Callable[[Block], Awaitable[None]] | None = None,
                 cosign: Callable[[bytes], bytes] | None = None) -> None:
        self.check_csr = check_csr
        self.verify_proofs = verify_proofs
        self.set_stake = set_stake
        self.development = development
        self.minimum_stake = minimum_stake
        self.on_block = on_block
        self.cosign = cosign
        self.executed = 0
        self.checkpoints: dict[str, tuple[int, int, int]] = {}
        """CT log origin -> (size, block height, decision index) of its latest
        committed checkpoint."""

    async def check(self, decision: bytes, validators: ValidatorSet) -> str | None:
        try:
            sealed = open_sealed(decision, validators)
        except DecisionError as exc:
            return str(exc)
        body = sealed.body
        try:
            if sealed.kind == "issue":
                csr = body.get("csr")
                if not isinstance(csr, bytes):
                    return "issue: no CSR"
                self.check_csr(csr)
                if body.get("internal") is True:
                    return None if body.get("proofs") is None else "internal with proofs"
                await self.verify_proofs("issue", hashlib.sha256(csr).digest(),
                                         body.get("proofs"))
                return None
            if sealed.kind == "revoke":
                request = body.get("request")
                if not isinstance(request, bytes) or len(request) != 32:
                    return "revoke: no request digest"
                await self.verify_proofs("revoke", request, body.get("proofs"))
                return None
            if sealed.kind == "checkpoint":
                return self._check_checkpoint(body)
            if sealed.kind == "stake":
                if not self.development:
                    return "stake credits (the faucet) exist in development mode only"
                if body.get("amount") != self.minimum_stake or body.get("reason") != "faucet":
                    return "a faucet credit is exactly the minimum stake"
                if not isinstance(body.get("key_id"), str) or len(body["key_id"]) != 64:
                    return "stake: no key id"
                return None
        except ProofInvalid as exc:
            return f"proof {exc.details.get('proof', '?')} invalid: {exc.message}"
        except TrustChainError as exc:
            return f"{exc.code.value}: {exc.message}"
        return f"unknown decision kind {sealed.kind!r}"

    def _check_checkpoint(self, body: dict[str, Any]) -> str | None:
        origin, size, root, note = (body.get("origin"), body.get("size"), body.get("root"),
                                    body.get("note"))
        if not (isinstance(origin, str) and 0 < len(origin) <= 256 and type(size) is int
                and size >= 0 and isinstance(root, bytes) and len(root) == 32
                and isinstance(note, str) and len(note) <= 8192):
            return "checkpoint: origin, size, root and note are required"
        try:
            text = checkpoint_body(note)
        except ValueError as exc:
            return f"checkpoint: {exc}"
        if not text.startswith(f"{origin}\n{size}\n{base64.b64encode(root).decode()}\n"):
            return "checkpoint: the note does not match its origin, size and root"
        committed = self.checkpoints.get(origin)
        if committed is not None and size < committed[0]:
            return (f"checkpoint: {origin} is already committed at size {committed[0]}; "
                    "a checkpoint never goes back")
        return None

    async def execute(self, block: Block, commit: Commit) -> None:
        for index, decision in enumerate(block.decisions):
            try:
                item = decode_item(decision)
                body = decode_item(item["body"])
            except Exception:  # checked before commit; cannot happen to an honest quorum
                log.error("a committed decision does not decode", extra={"height": block.height})
                continue
            if body.get("kind") == "stake":
                await self.set_stake(body["key_id"], int(body["amount"]), "faucet")
            elif body.get("kind") == "checkpoint":
                self.checkpoints[str(body["origin"])] = (int(body["size"]), block.height, index)
            self.executed += 1
        if self.on_block is not None:
            await self.on_block(block)

    def extension(self, block: Block) -> bytes:
        """Cosignatures of the block's CT checkpoints (c2sp.org/tlog-cosignature)."""
        return precommit_extension(block, self.cosign) if self.cosign is not None else b""
