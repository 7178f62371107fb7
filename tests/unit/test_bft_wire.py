"""Every consensus message, as the core and the driver put it on the wire, matches
the CDDL of spec/stoq.cddl (bft-proposal, bft-vote, bft-evidence, bft-decided,
bft-commit, decision-batch, compact-proposal, want-proposal), and decodes back to
itself."""

from __future__ import annotations

from typing import Any

import cbor2
import pycddl
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from handlers.consensus._compact import (
    compact_proposal,
    parse_want,
    rebuild_proposal,
    want_proposal,
)
from handlers.consensus._driver import decided_message, decision_digest
from handlers.consensus.bft import (
    BadMessage,
    Block,
    Commit,
    CommitMessage,
    DuplicateVoteEvidence,
    Proposal,
    Validator,
    ValidatorSet,
    Vote,
    VoteType,
    decode_message,
    encode_message,
)
from protocol import encode_deterministic
from tests.helpers import CDDL

CHAIN = "wire-test"


def _schema(rule: str) -> pycddl.Schema:
    return pycddl.Schema(f"root = {rule}\n{CDDL}")


@pytest.fixture(scope="module")
def keys() -> list[Ed25519PrivateKey]:
    return [Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32) for i in range(4)]


def _validators(keys: list[Ed25519PrivateKey]) -> ValidatorSet:
    return ValidatorSet(tuple(Validator(k.public_key().public_bytes(Encoding.Raw,
                                                                    PublicFormat.Raw))
                              for k in keys))


def test_every_message_matches_the_cddl(keys: list[Ed25519PrivateKey]) -> None:
    validators = _validators(keys)
    ids = [v.id for v in validators.validators]
    by_id = {Validator(k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).id: k
             for k in keys}
    block = Block(height=1, previous=bytes(32), time_ms=1_795_000_000_000, proposer=ids[0],
                  decisions=(b"decision",))
    proposal = Proposal(1, 0, block, -1, ids[0]).signed(CHAIN, by_id[ids[0]].sign)
    votes = [Vote(VoteType.PRECOMMIT, 1, 0, block.id, i, extension=b"\x80").signed(
        CHAIN, by_id[i].sign) for i in ids[:3]]
    nil = Vote(VoteType.PREVOTE, 1, 0, None, ids[3]).signed(CHAIN, by_id[ids[3]].sign)
    other = Vote(VoteType.PREVOTE, 1, 0, block.id, ids[3]).signed(CHAIN, by_id[ids[3]].sign)
    evidence = DuplicateVoteEvidence.of(nil, other)
    evidence.verify(CHAIN, validators)
    commit = Commit(1, 0, block.id, tuple(votes))
    commit.verify(CHAIN, validators)
    with_evidence = Block(height=2, previous=block.id, time_ms=block.time_ms + 1,
                          proposer=ids[1], evidence=(evidence,))
    decided = CommitMessage(block, commit)
    cases = [("bft-proposal", proposal), ("bft-vote", votes[0]), ("bft-vote", nil),
             ("bft-evidence", evidence), ("bft-decided", decided)]
    for rule, message in cases:
        wire = encode_message(message)
        _schema(rule).validate_cbor(wire)
        _schema("bft-message").validate_cbor(wire)
        assert decode_message(wire) == message
    _schema("bft-block").validate_cbor(with_evidence.encoded)
    _schema("bft-commit").validate_cbor(encode_deterministic(commit.to_wire()))
    batch = encode_deterministic({"kind": "decisions", "items": [b"a", b"b"]})
    _schema("decision-batch").validate_cbor(batch)


def test_the_cddl_refuses_a_malformed_vote(keys: list[Ed25519PrivateKey]) -> None:
    """The schema is not vacuous: a vote with a short block id does not match."""
    item = {"kind": "vote", "type": 1, "height": 1, "round": 0, "block_id": b"short",
            "validator": "00" * 20, "signature": bytes(64)}
    with pytest.raises(Exception):  # noqa: B017 (pycddl raises its own error type)
        _schema("bft-vote").validate_cbor(cbor2.dumps(item))


def test_a_compact_proposal_matches_the_cddl_and_rebuilds_the_signed_proposal(
        keys: list[Ed25519PrivateKey]) -> None:
    validators = _validators(keys)
    proposer = validators.validators[0].id
    decisions = (b"first" * 200, b"second" * 200, b"third" * 200)
    block = Block(height=3, previous=bytes(32), time_ms=1_795_000_000_000, proposer=proposer,
                  decisions=decisions)
    proposal = Proposal(3, 1, block, -1, proposer).signed(CHAIN, keys[0].sign)
    digests = [decision_digest(d) for d in decisions]
    wire = compact_proposal(proposal, digests)
    _schema("compact-proposal").validate_cbor(wire)
    whole = encode_message(proposal)
    assert len(wire) < len(whole) - sum(map(len, decisions)) + 3 * 40 + 64  # digests
    mempool = {decision_digest(d): d for d in decisions}
    rebuilt = rebuild_proposal(cbor2.loads(wire), mempool.get)
    assert rebuilt == proposal and isinstance(rebuilt, Proposal)
    assert rebuilt.verify(CHAIN, validators)  # the signature covers the rebuilt block
    assert rebuilt.block.digests == block.digests == tuple(digests)  # the mempool's keys
    with pytest.raises(ValueError, match="one digest a decision"):
        block.knowing_digests(digests[:2])
    del mempool[digests[1]]
    assert rebuild_proposal(cbor2.loads(wire), mempool.get) == (3, 1)  # ask for it whole
    want = want_proposal(3, 1)
    _schema("want-proposal").validate_cbor(want)
    assert parse_want(cbor2.loads(want)) == (3, 1)
    # A digest list that does not match the block rebuilds a block the signature refuses.
    swapped = cbor2.loads(wire)
    swapped["digests"] = [digests[1], digests[0], digests[2]]
    mempool[digests[1]] = decisions[1]
    wrong = rebuild_proposal(swapped, mempool.get)
    assert isinstance(wrong, Proposal) and not wrong.verify(CHAIN, validators)


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.update(digests=[b"short"]), "digests of 32 bytes"),
    (lambda m: m["proposal"]["block"].update(decisions=[b"x"]), "must be empty"),
    (lambda m: m["proposal"].update(height=True), "height and round"),
    (lambda m: m.pop("proposal"), "proposal map"),
])
def test_a_malformed_compact_proposal_is_refused(keys: list[Ed25519PrivateKey], change: Any,
                                                 message: str) -> None:
    proposer = _validators(keys).validators[0].id
    block = Block(height=1, previous=bytes(32), time_ms=1, proposer=proposer, decisions=(b"d",))
    item = cbor2.loads(compact_proposal(Proposal(1, 0, block, -1, proposer).signed(
        CHAIN, keys[0].sign), [decision_digest(b"d")]))
    change(item)
    with pytest.raises(BadMessage, match=message):
        rebuild_proposal(item, {decision_digest(b"d"): b"d"}.get)
    with pytest.raises(BadMessage, match="height and round"):
        parse_want({"kind": "want-proposal", "height": 0, "round": 0})


def test_a_stored_block_is_sent_as_the_decided_message_it_encodes(
        keys: list[Ed25519PrivateKey]) -> None:
    validators = _validators(keys)
    by_id = {Validator(k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).id: k
             for k in keys}
    ids = [v.id for v in validators.validators]
    block = Block(height=7, previous=bytes(32), time_ms=1_795_000_000_000, proposer=ids[0],
                  decisions=(b"a" * 300, b"b"))
    votes = tuple(Vote(VoteType.PRECOMMIT, 7, 0, block.id, i).signed(CHAIN, by_id[i].sign)
                  for i in ids[:3])
    commit = Commit(7, 0, block.id, votes)
    spliced = decided_message(block.encoded, encode_deterministic(commit.to_wire()))
    assert spliced == encode_message(CommitMessage(block, commit))
    _schema("bft-decided").validate_cbor(spliced)
