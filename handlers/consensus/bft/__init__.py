"""Tendermint BFT consensus (Buchman, Kwon, Milosevic 2018) without I/O.

``_types``: validators, blocks, signed proposals and votes, commits and
evidence, all deterministic CBOR. ``_core``: the state machine (messages and
timeouts in, effects out). ``tests/bft_sim.py`` is a seeded discrete-event
network that drives several cores for tests. ``handlers.consensus._cluster``
runs a core over STOQ.
"""

from ._types import (
    CONTEXT,
    GENESIS_ID,
    BadMessage,
    Block,
    Commit,
    CommitMessage,
    DuplicateVoteEvidence,
    Message,
    Proposal,
    SigningState,
    Validator,
    ValidatorSet,
    Vote,
    VoteType,
    decode_message,
    encode_message,
    validator_id,
)

__all__ = [
    "CONTEXT",
    "GENESIS_ID",
    "BadMessage",
    "Block",
    "Commit",
    "CommitMessage",
    "DuplicateVoteEvidence",
    "Message",
    "Proposal",
    "SigningState",
    "Validator",
    "ValidatorSet",
    "Vote",
    "VoteType",
    "decode_message",
    "encode_message",
    "validator_id",
]

from ._core import (
    Application,
    Broadcast,
    Decided,
    Effect,
    EvidenceFound,
    Misbehaviour,
    NeedBlocks,
    PeerBehind,
    PersistSigningState,
    ScheduleTimeout,
    SendTo,
    Step,
    Tendermint,
    Timeouts,
)

__all__ += [
    "Application",
    "Broadcast",
    "Decided",
    "Effect",
    "EvidenceFound",
    "Misbehaviour",
    "NeedBlocks",
    "PeerBehind",
    "PersistSigningState",
    "ScheduleTimeout",
    "SendTo",
    "Step",
    "Tendermint",
    "Timeouts",
]
