"""The values Tendermint agrees on and the signed messages it exchanges.

Everything is encoded as deterministic CBOR (RFC 8949 §4.2.1), so that every
validator hashes and signs the same bytes for the same value. A validator is
an Ed25519 key (the C2SP cosignature algorithm, and about 50 µs to verify);
its id is the first 20 bytes of the SHA-256 of the raw key, in hex.

Sign bytes always start with :data:`CONTEXT` and the chain id, so a signature
made for one cluster, or for one message kind, is worthless for another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import IntEnum
from functools import cached_property
from typing import Any

from protocol import decode_item, encode_deterministic
from protocol.ed25519 import ed25519_verifies

CONTEXT = "trustchain-bft-v1"
ID_SIZE = 20
HASH_SIZE = 32
MAX_DECISION_SIZE = 64 * 1024
MAX_DECISIONS = 4096
MAX_EVIDENCE = 64
MAX_ROUND = 1 << 20


class BadMessage(ValueError):
    """A consensus message that is malformed or whose signature does not verify."""


class VoteType(IntEnum):
    PREVOTE = 1
    PRECOMMIT = 2


def validator_id(public_key: bytes) -> str:
    """The id of the validator whose raw Ed25519 public key is ``public_key``."""
    return hashlib.sha256(public_key).digest()[:ID_SIZE].hex()


@dataclass(frozen=True, slots=True)
class Validator:
    public_key: bytes
    """Raw 32-byte Ed25519 public key."""
    power: int = 1
    address: str = ""
    """IPv6 address of its STOQ endpoint (networking only; not part of any hash)."""
    port: int = 0

    @property
    def id(self) -> str:
        return validator_id(self.public_key)

    def verify(self, signature: bytes, message: bytes) -> bool:
        return ed25519_verifies(self.public_key, signature, message)


@dataclass(frozen=True)
class ValidatorSet:
    """The validators of one height, ordered by id; quorums count voting power.

    A validator with power 0 (isolated) stays in the set, so that its old
    signatures can still be checked as evidence, but it counts for nothing,
    never proposes, and its messages are ignored.
    """

    validators: tuple[Validator, ...]

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.validators, key=lambda v: v.id))
        object.__setattr__(self, "validators", ordered)
        ids = [v.id for v in ordered]
        if len(set(ids)) != len(ids):
            raise ValueError("a validator appears twice")
        if not any(v.power > 0 for v in ordered):
            raise ValueError("a validator set needs some voting power")
        if any(v.power < 0 for v in ordered):
            raise ValueError("voting power cannot be negative")

    @cached_property
    def by_id(self) -> dict[str, Validator]:
        return {v.id: v for v in self.validators}

    @cached_property
    def active(self) -> tuple[Validator, ...]:
        return tuple(v for v in self.validators if v.power > 0)

    @cached_property
    def total_power(self) -> int:
        return sum(v.power for v in self.validators)

    def power_of(self, ids: Iterable[str]) -> int:
        by_id = self.by_id
        return sum(by_id[i].power for i in set(ids) if i in by_id)

    def has_quorum(self, power: int) -> bool:
        """More than two thirds of the voting power (2f+1 of n = 3f+1)."""
        return 3 * power > 2 * self.total_power

    def has_one_third(self, power: int) -> bool:
        """More than a third of the voting power (f+1): at least one honest validator."""
        return 3 * power > self.total_power

    def proposer(self, height: int, round: int) -> str:
        """Round robin over the active validators by id (power weighs quorums only)."""
        active = self.active
        return active[(height + round) % len(active)].id

    def isolate(self, ids: Iterable[str]) -> ValidatorSet:
        """This set with the voting power of ``ids`` set to 0."""
        drop = set(ids)
        return ValidatorSet(tuple(replace(v, power=0) if v.id in drop else v
                                  for v in self.validators))

    def to_wire(self) -> list[Any]:
        return [[v.public_key, v.power] for v in self.validators]

    def digest(self) -> bytes:
        return hashlib.sha256(encode_deterministic([CONTEXT, "validators",
                                                    self.to_wire()])).digest()


# --- helpers for decoding untrusted maps ---------------------------------------------


def _get(item: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = item.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadMessage(f"{key}: missing or not a {getattr(kind, '__name__', kind)}")
    return value


def _uint(item: dict[str, Any], key: str, maximum: int = (1 << 63) - 1) -> int:
    value: int = _get(item, key, int)
    if isinstance(value, bool) or not 0 <= value <= maximum:
        raise BadMessage(f"{key}: {value!r} is out of range")
    return value


def _hash(item: dict[str, Any], key: str, *, nullable: bool = False) -> bytes | None:
    value = item.get(key)
    if value is None and nullable:
        return None
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise BadMessage(f"{key}: not a {HASH_SIZE}-byte hash")
    return value


def _id(item: dict[str, Any], key: str) -> str:
    value: str = _get(item, key, str)
    if len(value) != 2 * ID_SIZE or any(c not in "0123456789abcdef" for c in value):
        raise BadMessage(f"{key}: not a validator id")
    return value


def _signature(item: dict[str, Any]) -> bytes:
    value: bytes = _get(item, "signature", bytes)
    if len(value) != 64:
        raise BadMessage("signature: not a 64-byte Ed25519 signature")
    return value


# --- values ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One height's agreed value: an ordered batch of application decisions.

    ``decisions`` are opaque to consensus (deterministic-CBOR application
    records: CA issuances, revocations, stake changes, CT checkpoints);
    ``evidence`` is misbehaviour proven since the last block.
    """

    height: int
    previous: bytes
    """Id of the block at ``height - 1`` (32 zero bytes for height 1)."""
    time_ms: int
    """Proposer's Unix time in milliseconds; the application checks it."""
    proposer: str
    decisions: tuple[bytes, ...] = ()
    evidence: tuple[DuplicateVoteEvidence, ...] = ()
    app_hash: bytes = bytes(HASH_SIZE)
    """The application's state hash after executing the block at ``height - 1``: a
    validator whose own differs has diverged."""

    def to_wire(self) -> dict[str, Any]:
        return {"height": self.height, "previous": self.previous, "time_ms": self.time_ms,
                "proposer": self.proposer, "app_hash": self.app_hash,
                "decisions": list(self.decisions),
                "evidence": [e.to_wire() for e in self.evidence]}

    @cached_property
    def encoded(self) -> bytes:
        return encode_deterministic(self.to_wire())

    @cached_property
    def id(self) -> bytes:
        return hashlib.sha256(self.encoded).digest()

    @cached_property
    def digests(self) -> tuple[bytes, ...]:
        """The SHA-256 of each decision (its id in a mempool and in the store), computed
        once a block: checking, proposing and storing a block all ask."""
        return tuple(hashlib.sha256(decision).digest() for decision in self.decisions)

    def knowing_digests(self, digests: Iterable[bytes]) -> Block:
        """This block, its :attr:`digests` already known (a block rebuilt from the
        decisions a mempool holds by digest)."""
        known = tuple(digests)
        if len(known) != len(self.decisions):
            raise ValueError("one digest a decision")
        self.__dict__["digests"] = known  # what the cached property would compute
        return self

    @classmethod
    def from_wire(cls, item: Any) -> Block:
        if not isinstance(item, dict):
            raise BadMessage("block: not a map")
        decisions = _get(item, "decisions", list)
        if len(decisions) > MAX_DECISIONS or not all(
                isinstance(d, bytes) and len(d) <= MAX_DECISION_SIZE for d in decisions):
            raise BadMessage("block.decisions: too many, or not byte strings of at most "
                             f"{MAX_DECISION_SIZE} bytes")
        evidence = _get(item, "evidence", list)
        if len(evidence) > MAX_EVIDENCE:
            raise BadMessage("block.evidence: too many")
        height = _uint(item, "height")
        if height < 1:
            raise BadMessage("block.height: heights start at 1")
        previous = _hash(item, "previous")
        app_hash = _hash(item, "app_hash")
        assert previous is not None and app_hash is not None
        return cls(height=height, previous=previous, time_ms=_uint(item, "time_ms"),
                   proposer=_id(item, "proposer"), decisions=tuple(decisions),
                   evidence=tuple(DuplicateVoteEvidence.from_wire(e) for e in evidence),
                   app_hash=app_hash)


GENESIS_ID = bytes(HASH_SIZE)
"""The ``previous`` of the block at height 1."""


# --- signed messages ----------------------------------------------------------------------


@dataclass(frozen=True)
class Vote:
    type: VoteType
    height: int
    round: int
    block_id: bytes | None
    """The voted block's id; ``None`` is a vote for nil."""
    validator: str
    signature: bytes = b""
    extension: bytes = b""
    """Application data a precommit carries (for example C2SP cosignatures of the
    CT checkpoints in the block); covered by the signature. Empty on prevotes."""

    def sign_bytes(self, chain_id: str) -> bytes:
        name = "prevote" if self.type is VoteType.PREVOTE else "precommit"
        return encode_deterministic([CONTEXT, chain_id, name, self.height, self.round,
                                     self.block_id, self.validator, self.extension])

    def signed(self, chain_id: str, sign: Callable[[bytes], bytes]) -> Vote:
        return replace(self, signature=sign(self.sign_bytes(chain_id)))

    def verify(self, chain_id: str, validators: ValidatorSet) -> bool:
        validator = validators.by_id.get(self.validator)
        return validator is not None and validator.verify(self.signature,
                                                          self.sign_bytes(chain_id))

    def to_wire(self) -> dict[str, Any]:
        item: dict[str, Any] = {"kind": "vote", "type": int(self.type), "height": self.height,
                                "round": self.round, "block_id": self.block_id,
                                "validator": self.validator, "signature": self.signature}
        if self.extension:
            item["extension"] = self.extension
        return item

    @classmethod
    def from_wire(cls, item: Any) -> Vote:
        if not isinstance(item, dict) or item.get("kind") != "vote":
            raise BadMessage("vote: not a vote map")
        kind = _uint(item, "type", 2)
        if kind not in (1, 2):
            raise BadMessage("vote.type: must be 1 (prevote) or 2 (precommit)")
        extension = item.get("extension", b"")
        if not isinstance(extension, bytes) or len(extension) > MAX_DECISION_SIZE:
            raise BadMessage("vote.extension: not a byte string")
        return cls(type=VoteType(kind), height=_uint(item, "height"),
                   round=_uint(item, "round", MAX_ROUND),
                   block_id=_hash(item, "block_id", nullable=True),
                   validator=_id(item, "validator"), signature=_signature(item),
                   extension=extension)


@dataclass(frozen=True)
class Proposal:
    height: int
    round: int
    block: Block
    valid_round: int
    """-1, or the round in which ``block`` got a quorum of prevotes (re-proposal)."""
    proposer: str
    signature: bytes = b""

    def sign_bytes(self, chain_id: str) -> bytes:
        return encode_deterministic([CONTEXT, chain_id, "proposal", self.height, self.round,
                                     self.block.id, self.valid_round, self.proposer])

    def signed(self, chain_id: str, sign: Callable[[bytes], bytes]) -> Proposal:
        return replace(self, signature=sign(self.sign_bytes(chain_id)))

    def verify(self, chain_id: str, validators: ValidatorSet) -> bool:
        validator = validators.by_id.get(self.proposer)
        return validator is not None and validator.verify(self.signature,
                                                          self.sign_bytes(chain_id))

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "proposal", "height": self.height, "round": self.round,
                "block": self.block.to_wire(), "valid_round": self.valid_round,
                "proposer": self.proposer, "signature": self.signature}

    @classmethod
    def from_wire(cls, item: Any) -> Proposal:
        if not isinstance(item, dict) or item.get("kind") != "proposal":
            raise BadMessage("proposal: not a proposal map")
        valid_round = _get(item, "valid_round", int)
        if isinstance(valid_round, bool) or not -1 <= valid_round <= MAX_ROUND:
            raise BadMessage("proposal.valid_round: out of range")
        return cls(height=_uint(item, "height"), round=_uint(item, "round", MAX_ROUND),
                   block=Block.from_wire(item.get("block")), valid_round=valid_round,
                   proposer=_id(item, "proposer"), signature=_signature(item))


@dataclass(frozen=True)
class Commit:
    """A block's finality certificate: precommits for it by more than 2/3 of the power."""

    height: int
    round: int
    block_id: bytes
    precommits: tuple[Vote, ...]

    def verify(self, chain_id: str, validators: ValidatorSet) -> None:
        """Raise :class:`BadMessage` unless this is a valid commit under ``validators``."""
        signers: set[str] = set()
        for vote in self.precommits:
            if (vote.type is not VoteType.PRECOMMIT or vote.height != self.height
                    or vote.round != self.round or vote.block_id != self.block_id):
                raise BadMessage("commit: a vote that is not a precommit for this block")
            if vote.validator in signers:
                raise BadMessage("commit: a validator signs twice")
            if not vote.verify(chain_id, validators):
                raise BadMessage(f"commit: bad signature from {vote.validator}")
            signers.add(vote.validator)
        if not validators.has_quorum(validators.power_of(signers)):
            raise BadMessage("commit: the signers hold no more than 2/3 of the voting power")

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "commit", "height": self.height, "round": self.round,
                "block_id": self.block_id, "precommits": [v.to_wire() for v in self.precommits]}

    @classmethod
    def from_wire(cls, item: Any) -> Commit:
        if not isinstance(item, dict) or item.get("kind") != "commit":
            raise BadMessage("commit: not a commit map")
        votes = _get(item, "precommits", list)
        if len(votes) > 1024:
            raise BadMessage("commit.precommits: too many")
        block_id = _hash(item, "block_id")
        assert block_id is not None
        return cls(height=_uint(item, "height"), round=_uint(item, "round", MAX_ROUND),
                   block_id=block_id, precommits=tuple(Vote.from_wire(v) for v in votes))


@dataclass(frozen=True)
class DuplicateVoteEvidence:
    """Two votes one validator signed for the same height, round and type, but
    different blocks: proof that it equivocated. Stored in a canonical order
    (by encoded vote), so the same misbehaviour has one encoding."""

    vote_a: Vote
    vote_b: Vote

    @classmethod
    def of(cls, first: Vote, second: Vote) -> DuplicateVoteEvidence:
        a, b = sorted((first, second), key=lambda v: encode_deterministic(v.to_wire()))
        return cls(a, b)

    @property
    def offender(self) -> str:
        return self.vote_a.validator

    @property
    def height(self) -> int:
        return self.vote_a.height

    def verify(self, chain_id: str, validators: ValidatorSet) -> None:
        """Raise :class:`BadMessage` unless this proves equivocation under ``validators``."""
        a, b = self.vote_a, self.vote_b
        if (a.validator != b.validator or a.height != b.height or a.round != b.round
                or a.type != b.type):
            raise BadMessage("evidence: the votes are not for the same validator, height, "
                             "round and type")
        if a.block_id == b.block_id:
            raise BadMessage("evidence: the votes do not conflict")
        if a.validator not in validators.by_id:
            raise BadMessage("evidence: not a validator")
        if not (a.verify(chain_id, validators) and b.verify(chain_id, validators)):
            raise BadMessage("evidence: a vote's signature does not verify")

    @cached_property
    def id(self) -> bytes:
        return hashlib.sha256(encode_deterministic(self.to_wire())).digest()

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "evidence", "vote_a": self.vote_a.to_wire(),
                "vote_b": self.vote_b.to_wire()}

    @classmethod
    def from_wire(cls, item: Any) -> DuplicateVoteEvidence:
        if not isinstance(item, dict) or item.get("kind") != "evidence":
            raise BadMessage("evidence: not an evidence map")
        return cls.of(Vote.from_wire(item.get("vote_a")), Vote.from_wire(item.get("vote_b")))


@dataclass(frozen=True)
class CommitMessage:
    """A decided block with its commit: how a validator that is behind catches up."""

    block: Block
    commit: Commit

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "decided", "block": self.block.to_wire(),
                "commit": self.commit.to_wire()}

    @classmethod
    def from_wire(cls, item: Any) -> CommitMessage:
        if not isinstance(item, dict) or item.get("kind") != "decided":
            raise BadMessage("decided: not a decided map")
        return cls(Block.from_wire(item.get("block")), Commit.from_wire(item.get("commit")))


Message = Proposal | Vote | DuplicateVoteEvidence | CommitMessage

_DECODERS: dict[str, Any] = {"proposal": Proposal.from_wire, "vote": Vote.from_wire,
                             "evidence": DuplicateVoteEvidence.from_wire,
                             "decided": CommitMessage.from_wire}


def encode_message(message: Message) -> bytes:
    return encode_deterministic(message.to_wire())


def decode_message(data: bytes) -> Message:
    """The message in ``data``; :class:`BadMessage` if it is not one (signatures unchecked)."""
    try:
        item = decode_item(data)
    except Exception as exc:  # the strict decoder raises several kinds
        raise BadMessage(f"not CBOR: {exc}") from None
    kind = item.get("kind") if isinstance(item, dict) else None
    decoder = _DECODERS.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise BadMessage("not a consensus message (kind must be proposal, vote, evidence "
                         "or decided)")
    message: Message = decoder(item)
    return message


@dataclass
class SigningState:
    """What this validator must not forget across a restart, persisted (fsync) before
    any message that depends on it leaves the node.

    The last height/round/step it signed, so that a restarted validator never signs
    a conflicting proposal or vote: ``step`` is 0 (proposal), 1 (prevote), 2
    (precommit), -1 before any. Signing the same step again is allowed only for
    the same ``block_id`` (Ed25519 is deterministic, so that re-creates the same
    signature).

    And, for ``height``, Algorithm 1's lock and valid value, so that a restart
    is not an amnesia fault: ``locked_round``/``locked_block_id`` (-1/None when
    not locked), ``valid_round``/``valid_block_id`` (likewise). ``locked_block``
    is the encoded locked block (:attr:`Block.encoded`), and ``valid_block`` the
    encoded valid block when it is not the locked one (None when it is): if
    every validator crashes right after precommitting, nobody else has the block
    any more. Either may be None while its id is known (the node has not seen
    the block since a restart); the core then never votes for another block than
    the locked one until a later proof-of-lock frees it.

    Cost: once locked (or with a valid value) at a height, every persist (about
    one per signature, a few per round) writes that block again, and the valid
    block too if it differs: up to two blocks (a few MB each at most) per
    signature, until the next height's first signature drops them. Without a
    lock the encoding is what it was before these fields existed.
    """

    height: int = 0
    round: int = -1
    step: int = -1
    block_id: bytes | None = None
    locked_round: int = -1
    locked_block_id: bytes | None = None
    locked_block: bytes | None = None
    valid_round: int = -1
    valid_block_id: bytes | None = None
    valid_block: bytes | None = None

    def allows(self, height: int, round: int, step: int, block_id: bytes | None) -> bool:
        here = (height, round, step)
        last = (self.height, self.round, self.step)
        return here > last or (here == last and block_id == self.block_id)

    def to_wire(self) -> dict[str, Any]:
        """A CBOR map; the lock and valid keys only when set (so a state without them
        encodes as it did before they existed)."""
        item: dict[str, Any] = {"height": self.height, "round": self.round,
                                "step": self.step, "block_id": self.block_id}
        if self.locked_round >= 0:
            item["locked_round"] = self.locked_round
            item["locked_block_id"] = self.locked_block_id
        if self.locked_block is not None:
            item["locked_block"] = self.locked_block
        if self.valid_round >= 0:
            item["valid_round"] = self.valid_round
            item["valid_block_id"] = self.valid_block_id
        if self.valid_block is not None:
            item["valid_block"] = self.valid_block
        return item

    @classmethod
    def from_wire(cls, item: Any) -> SigningState:
        """Decode :meth:`to_wire`'s map (missing lock keys mean 'not locked');
        :class:`ValueError` if it is not a consistent signing state."""
        if not isinstance(item, dict):
            raise ValueError("signing state: not a map")

        def integer(key: str, low: int, high: int = (1 << 63) - 1, default: int = -1) -> int:
            value = item.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"signing state: {key} is not an integer in [{low}, {high}]")
            return value

        def optional_bytes(key: str, size: int | None) -> bytes | None:
            value = item.get(key)
            if value is None:
                return None
            if not isinstance(value, bytes) or (size is not None and len(value) != size):
                raise ValueError(f"signing state: {key} is not "
                                 + (f"a {size}-byte string" if size else "a byte string"))
            return value

        for key in ("height", "round", "step"):
            if key not in item:
                raise ValueError(f"signing state: {key} is missing")
        state = cls(height=integer("height", 0), round=integer("round", -1, MAX_ROUND),
                    step=integer("step", -1, 2), block_id=optional_bytes("block_id", HASH_SIZE),
                    locked_round=integer("locked_round", -1, MAX_ROUND),
                    locked_block_id=optional_bytes("locked_block_id", HASH_SIZE),
                    locked_block=optional_bytes("locked_block", None),
                    valid_round=integer("valid_round", -1, MAX_ROUND),
                    valid_block_id=optional_bytes("valid_block_id", HASH_SIZE),
                    valid_block=optional_bytes("valid_block", None))
        for name in ("locked", "valid"):
            round = getattr(state, f"{name}_round")
            block_id = getattr(state, f"{name}_block_id")
            encoded = getattr(state, f"{name}_block")
            if (round == -1) != (block_id is None):
                raise ValueError(f"signing state: {name}_round and {name}_block_id disagree")
            if encoded is not None:
                try:
                    block = Block.from_wire(decode_item(encoded))
                except Exception as exc:  # the strict decoder raises several kinds
                    raise ValueError(f"signing state: {name}_block: {exc}") from None
                if block.id != block_id or block.height != state.height:
                    raise ValueError(f"signing state: {name}_block is not the block "
                                     f"{name}_block_id names at this height")
        return state

    def block(self, block_id: bytes | None) -> Block | None:
        """The locked or valid block with id ``block_id``, if its bytes are here (None
        if not, or if they do not decode)."""
        if block_id is None:
            return None
        for known, encoded in ((self.locked_block_id, self.locked_block),
                               (self.valid_block_id, self.valid_block)):
            if known == block_id and encoded is not None:
                try:
                    block = Block.from_wire(decode_item(encoded))
                except Exception:  # from_wire checks it; a state made by hand may be bad
                    return None
                return block if block.id == block_id else None
        return None
