"""The Tendermint core driven by hand: every message and timeout is chosen by the test.

Other validators are played by the test with their own keys (signed votes and
proposals), or by further cores wired together through :class:`Router`, a
synchronous in-memory network with no timeouts unless the test fires them.
Validators are numbered in :class:`ValidatorSet` order, so the proposer of
(height, round) is ``ids[(height + round) % n]``.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from handlers.consensus.bft import (
    GENESIS_ID,
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
from handlers.consensus.bft._core import (
    MAX_BUFFERED_PER_VALIDATOR,
    Broadcast,
    Decided,
    Effect,
    EvidenceFound,
    Misbehaviour,
    NeedBlocks,
    PeerBehind,
    PersistSigningState,
    ScheduleTimeout,
    Step,
    Tendermint,
    Timeouts,
)
from protocol import decode_item, encode_deterministic

CHAIN = "bft-core-test"
T = TypeVar("T")
PREVOTE, PRECOMMIT = VoteType.PREVOTE, VoteType.PRECOMMIT


class App:
    """Proposes one decision per block; rejects decisions starting with b"bad"."""

    def __init__(self, *, idle: bool = False) -> None:
        self.idle = idle
        self.asked: list[tuple[int, int]] = []

    def proposal(self, height: int, round: int) -> tuple[int, tuple[bytes, ...]] | None:
        self.asked.append((height, round))
        if self.idle:
            return None
        return 1000 * height + round, (b"decision %d/%d" % (height, round),)

    def valid(self, block: Block) -> bool:
        return not any(d.startswith(b"bad") for d in block.decisions)

    def precommit_extension(self, block: Block) -> bytes:
        return b"ext:" + block.id[:4]


def _key(i: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"bft-core-test/%d" % i).digest())


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class Cluster:
    """n validators' keys, and signed messages made on their behalf."""

    def __init__(self, n: int) -> None:
        keys = [_key(i) for i in range(n)]
        self.validators = ValidatorSet(tuple(Validator(_raw(k)) for k in keys))
        self.ids = [v.id for v in self.validators.validators]
        by_id = {validator_id(_raw(k)): k for k in keys}
        self.keys = [by_id[i] for i in self.ids]
        self.n = n

    def proposer(self, height: int, round: int) -> int:
        index = self.ids.index(self.validators.proposer(height, round))
        assert index == (height + round) % self.n
        return index

    def block(self, height: int = 1, *, proposer: int | None = None,
              previous: bytes = GENESIS_ID, time_ms: int | None = None,
              decisions: tuple[bytes, ...] = (b"x",),
              evidence: tuple[DuplicateVoteEvidence, ...] = ()) -> Block:
        who = self.proposer(height, 0) if proposer is None else proposer
        return Block(height=height, previous=previous,
                     time_ms=1000 * height if time_ms is None else time_ms,
                     proposer=self.ids[who], decisions=decisions, evidence=evidence)

    def proposal(self, block: Block, round: int = 0, valid_round: int = -1,
                 by: int | None = None) -> Proposal:
        who = self.proposer(block.height, round) if by is None else by
        return Proposal(block.height, round, block, valid_round, self.ids[who]
                        ).signed(CHAIN, self.keys[who].sign)

    def vote(self, i: int, kind: VoteType, round: int, block: Block | bytes | None,
             height: int = 1, extension: bytes = b"") -> Vote:
        block_id = block.id if isinstance(block, Block) else block
        return Vote(kind, height, round, block_id, self.ids[i], extension=extension
                    ).signed(CHAIN, self.keys[i].sign)

    def commit(self, block: Block, signers: Iterable[int], round: int = 0) -> Commit:
        return Commit(block.height, round, block.id,
                      tuple(self.vote(i, PRECOMMIT, round, block, block.height)
                            for i in signers))

    def evidence(self, i: int, height: int = 1, round: int = 0) -> DuplicateVoteEvidence:
        a = self.vote(i, PREVOTE, round, hashlib.sha256(b"a").digest(), height)
        b = self.vote(i, PREVOTE, round, None, height)
        return DuplicateVoteEvidence.of(a, b)

    def core(self, i: int | None, *, app: App | None = None,
             validators: ValidatorSet | None = None, height: int = 1,
             previous: Block | None = None, signing_state: SigningState | None = None,
             relay: bool = True, committed_evidence: Iterable[bytes] = ()) -> Tendermint:
        me = None if i is None else self.ids[i]
        sign = None if i is None else self.keys[i].sign
        return Tendermint(chain_id=CHAIN, validators=validators or self.validators,
                          app=app or App(), me=me, sign=sign, height=height,
                          previous=previous, signing_state=signing_state, relay=relay,
                          committed_evidence=committed_evidence)


def broadcasts(effects: list[Effect], kind: type | None = None) -> list[Message]:
    return [e.message for e in effects
            if isinstance(e, Broadcast) and (kind is None or isinstance(e.message, kind))]


def own_votes(effects: list[Effect], core: Tendermint) -> list[Vote]:
    return [m for m in broadcasts(effects, Vote)
            if isinstance(m, Vote) and m.validator == core.me]


def of_type(effects: list[Effect], kind: type[T]) -> list[T]:
    return [e for e in effects if isinstance(e, kind)]


def timeouts(effects: list[Effect], step: Step) -> list[ScheduleTimeout]:
    return [e for e in of_type(effects, ScheduleTimeout) if e.step == step]


class Router:
    """Cores wired together synchronously; a validator without a core is silent."""

    def __init__(self, cores: dict[str, Tendermint], *, wire: bool = False,
                 drop: Callable[[str, str, Message], bool] | None = None) -> None:
        self.cores = cores
        self.wire = wire
        self.drop = drop or (lambda src, dst, m: False)
        self.queue: deque[tuple[str, str, bytes | Message]] = deque()
        self.pending: dict[str, list[ScheduleTimeout]] = {i: [] for i in cores}
        self.effects: dict[str, list[Effect]] = {i: [] for i in cores}
        self.decided: dict[str, list[Decided]] = {i: [] for i in cores}

    def perform(self, src: str, effects: list[Effect]) -> None:
        self.effects[src] += effects
        for effect in effects:
            if isinstance(effect, Broadcast):
                for dst in self.cores:
                    if dst != src and not self.drop(src, dst, effect.message):
                        payload = encode_message(effect.message) if self.wire else effect.message
                        self.queue.append((src, dst, payload))
            elif isinstance(effect, ScheduleTimeout):
                self.pending[src].append(effect)
            elif isinstance(effect, Decided):
                self.decided[src].append(effect)

    def start(self) -> None:
        for i, core in self.cores.items():
            self.perform(i, core.start())

    def run(self, height: int, limit: int = 100_000) -> None:
        """Deliver messages until every core decided ``height`` or none are left."""
        while self.queue and not all(core.height > height for core in self.cores.values()):
            limit -= 1
            assert limit > 0, "the router did not go quiet"
            src, dst, payload = self.queue.popleft()
            message = decode_message(payload) if isinstance(payload, bytes) else payload
            self.perform(dst, self.cores[dst].receive(message, src))

    def fire(self, step: Step, height: int) -> None:
        """Fire, on every core, the pending ``step`` timeouts for its current height and
        round; then deliver messages as :meth:`run`."""
        for i, core in self.cores.items():
            due = [t for t in self.pending[i]
                   if t.step == step and (t.height, t.round) == (core.height, core.round)]
            for t in due:
                self.pending[i].remove(t)
                self.perform(i, core.on_timeout(t.step, t.height, t.round))
        self.run(height)


def _signed_then_persisted(effects: list[Effect], me: str | None) -> None:
    """Every own signed message leaves right after the PersistSigningState allowing it."""
    for k, effect in enumerate(effects):
        if isinstance(effect, Broadcast):
            m = effect.message
            if (isinstance(m, Vote) and m.validator == me) or (
                    isinstance(m, Proposal) and m.proposer == me):
                before = effects[k - 1]
                assert isinstance(before, PersistSigningState)
                step = 0 if isinstance(m, Proposal) else int(m.type)
                block_id = m.block.id if isinstance(m, Proposal) else m.block_id
                assert _last_signed(before.state) == (m.height, m.round, step, block_id)


def _last_signed(state: SigningState) -> tuple[int, int, int, bytes | None]:
    return state.height, state.round, state.step, state.block_id


# --- basics -----------------------------------------------------------------------------------


def test_timeouts_grow_by_delta_per_round() -> None:
    t = Timeouts(propose=1.0, prevote=0.5, precommit=0.25, delta=0.25)
    assert t.of("propose", 0) == 1.0
    assert t.of("prevote", 2) == 1.0
    assert t.of("precommit", 4) == 1.25


def test_single_validator_decides_alone() -> None:
    c = Cluster(1)
    core = c.core(0)
    effects = core.start()
    _signed_then_persisted(effects, core.me)
    [decided] = of_type(effects, Decided)
    block = decided.block
    assert (block.height, block.previous, block.proposer) == (1, GENESIS_ID, c.ids[0])
    decided.commit.verify(CHAIN, c.validators)
    [precommit] = decided.commit.precommits
    assert precommit.extension == b"ext:" + block.id[:4]
    assert decided.validators == c.validators and decided.isolated == ()
    assert not timeouts(effects, "prevote") and not timeouts(effects, "precommit")
    # The next height's proposal waits for the driver (one decision per call).
    assert core.height == 2
    assert effects[-1] == ScheduleTimeout("propose", 2, 0, 0.0)
    again = core.on_timeout("propose", 2, 0)
    [second] = of_type(again, Decided)
    assert second.block.height == 2 and second.block.previous == block.id
    assert second.block.time_ms > block.time_ms
    assert core.signing_state == SigningState(
        2, 0, 2, second.block.id, locked_round=0, locked_block_id=second.block.id,
        locked_block=second.block.encoded, valid_round=0, valid_block_id=second.block.id)


def test_constructor_rejects_inconsistent_arguments() -> None:
    c = Cluster(4)
    with pytest.raises(ValueError):
        c.core(0, height=2)  # no previous block
    with pytest.raises(ValueError):
        c.core(0, height=3, previous=c.block(1))
    with pytest.raises(ValueError):
        Tendermint(chain_id=CHAIN, validators=c.validators, app=App(), me=c.ids[0])


@pytest.mark.parametrize("wire", [False, True])
def test_four_validators_decide_the_same_blocks(wire: bool) -> None:
    c = Cluster(4)
    router = Router({c.ids[i]: c.core(i) for i in range(4)}, wire=wire)
    router.start()
    router.run(3)  # no timeout fires: every height is decided in round 0
    for height in (1, 2, 3):
        assert len({d[height - 1].block.id for d in router.decided.values()}) == 1
    for i, decisions in router.decided.items():
        assert [d.block.height for d in decisions][:3] == [1, 2, 3]
        for d in decisions[:3]:
            assert d.block.proposer == c.ids[c.proposer(d.block.height, 0)]
            assert d.commit.round == 0
            d.commit.verify(CHAIN, c.validators)
            assert all(v.extension == b"ext:" + d.block.id[:4] for v in d.commit.precommits)
        _signed_then_persisted(router.effects[i], i)
    assert not any(of_type(e, Misbehaviour) or of_type(e, EvidenceFound)
                   for e in router.effects.values())


def test_proposer_pads_time_and_uses_previous() -> None:
    c = Cluster(4)
    previous = c.block(1, time_ms=50_000)
    proposer = c.proposer(2, 0)
    core = c.core(proposer, height=2, previous=previous)
    [proposal] = broadcasts(core.start(), Proposal)
    assert isinstance(proposal, Proposal)
    assert proposal.block.previous == previous.id and proposal.block.time_ms == 50_001
    assert proposal.valid_round == -1


# --- proposals ----------------------------------------------------------------------------------


def test_valid_proposal_gets_a_prevote_for_it() -> None:
    c = Cluster(4)
    core = c.core(0)
    core.start()
    block = c.block(1)
    effects = core.receive(c.proposal(block), c.ids[1])
    _signed_then_persisted(effects, core.me)
    [vote] = own_votes(effects, core)
    assert (vote.type, vote.round, vote.block_id) == (PREVOTE, 0, block.id)
    assert core.step == "prevote"


@pytest.mark.parametrize("change, reason", [
    ({"previous": b"\x01" * 32}, "previous"),
    ({"height": 2}, "height"),
    ({"time_ms": 0}, "time"),
    ({"decisions": (b"bad",)}, "application"),
    ({"proposer": "ab" * 20}, "not a validator"),
])
def test_invalid_proposal_gets_a_nil_prevote_and_blames_the_proposer(
        change: dict[str, Any], reason: str) -> None:
    c = Cluster(4)
    core = c.core(0)
    core.start()
    block = replace(c.block(1), **change)
    proposal = replace(c.proposal(c.block(1)), block=block).signed(CHAIN, c.keys[1].sign)
    effects = core.receive(proposal, c.ids[1])
    [blame] = of_type(effects, Misbehaviour)
    assert blame.validator == c.ids[1] and reason in blame.reason
    [vote] = own_votes(effects, core)
    assert vote.type is PREVOTE and vote.block_id is None


def test_proposal_with_bad_evidence_is_invalid() -> None:
    c = Cluster(4)
    core = c.core(0, committed_evidence=[c.evidence(3).id])
    core.start()
    for evidence, reason in ((c.evidence(3), "already committed"),
                             (replace(c.evidence(2), vote_b=c.evidence(2).vote_a),
                              "do not conflict")):
        block = c.block(1, evidence=(evidence,))
        effects = core.receive(c.proposal(block), c.ids[1])
        assert any(reason in m.reason for m in of_type(effects, Misbehaviour))
    assert [v.block_id for v in own_votes(core.gossip(), core)] == [None]


def test_proposals_out_of_turn_and_conflicting_are_reported() -> None:
    c = Cluster(4)
    core = c.core(0)
    core.start()
    block = c.block(1)
    effects = core.receive(c.proposal(block, by=2), c.ids[2])
    assert of_type(effects, Misbehaviour) == [Misbehaviour(c.ids[2], "proposal out of turn")]
    assert not own_votes(effects, core)
    core.receive(c.proposal(block), c.ids[1])
    other = c.block(1, decisions=(b"y",))
    effects = core.receive(c.proposal(other), c.ids[1])
    [blame] = of_type(effects, Misbehaviour)
    assert blame.validator == c.ids[1] and "conflicting" in blame.reason
    assert [v.block_id for v in own_votes(core.gossip(), core)] == [block.id]


def test_proposal_with_a_forged_signature_is_ignored() -> None:
    c = Cluster(4)
    core = c.core(0)
    core.start()
    forged = replace(c.proposal(c.block(1)), signature=bytes(64))
    effects = core.receive(forged, c.ids[2])
    assert of_type(effects, Misbehaviour) == [
        Misbehaviour(c.ids[2], "proposal with an invalid signature")]
    assert core.step == "propose" and not own_votes(effects, core)


def test_idle_proposer_waits_for_content() -> None:
    c = Cluster(4)
    app = App(idle=True)
    core = c.core(c.proposer(1, 0), app=app)
    effects = core.start()
    assert not broadcasts(effects) and not timeouts(effects, "propose")
    app.idle = False
    effects = core.content_available()
    [proposal] = broadcasts(effects, Proposal)
    assert isinstance(proposal, Proposal) and proposal.round == 0
    assert app.asked == [(1, 0), (1, 0)]
    assert core.content_available() == []  # already proposed
    # A non-proposer schedules its propose timeout as usual.
    assert timeouts(c.core(0, app=App(idle=True)).start(), "propose")


# --- votes, quorums, rounds ---------------------------------------------------------------------


def test_lock_and_reproposal_with_valid_round() -> None:
    c = Cluster(4)
    core = c.core(0)  # the proposer of round 3 at height 1
    core.start()
    b = c.block(1)
    core.receive(c.proposal(b), c.ids[1])
    effects = core.receive(c.vote(1, PREVOTE, 0, b), c.ids[1])
    assert not own_votes(effects, core)
    effects = core.receive(c.vote(2, PREVOTE, 0, b), c.ids[2])  # with ours: 2f+1 for b
    [precommit] = own_votes(effects, core)
    assert (precommit.type, precommit.block_id) == (PRECOMMIT, b.id)
    assert (core.locked_round, core.valid_round, core.step) == (0, 0, "precommit")
    # Round 0 fails: the others precommit nil; timeout precommit -> round 1.
    core.receive(c.vote(1, PRECOMMIT, 0, None), c.ids[1])
    effects = core.receive(c.vote(2, PRECOMMIT, 0, None), c.ids[2])
    assert timeouts(effects, "precommit") == [ScheduleTimeout("precommit", 1, 0, 0.5)]
    core.on_timeout("precommit", 1, 0)
    assert (core.round, core.step) == (1, "propose")
    # Round 1: a new block is proposed; we are locked on b: nil.
    fresh = c.block(1, proposer=2, decisions=(b"fresh",))
    effects = core.receive(c.proposal(fresh, 1), c.ids[2])
    assert [v.block_id for v in own_votes(effects, core)] == [None]
    # Round 2: b re-proposed with its valid round 0: we prevote b.
    core.receive(c.vote(1, PREVOTE, 2, None), c.ids[1])
    core.receive(c.vote(2, PREVOTE, 2, None), c.ids[2])  # f+1 in round 2: skip there
    assert core.round == 2
    effects = core.receive(c.proposal(b, 2, valid_round=0), c.ids[3])
    assert [v.block_id for v in own_votes(effects, core)] == [b.id]
    # Round 3 is ours: we re-propose our valid value with its valid round.
    core.receive(c.vote(1, PREVOTE, 3, None), c.ids[1])
    effects = core.receive(c.vote(2, PREVOTE, 3, None), c.ids[2])
    [proposal] = broadcasts(effects, Proposal)
    assert isinstance(proposal, Proposal)
    assert (proposal.round, proposal.block, proposal.valid_round) == (3, b, 0)


def test_a_later_proof_of_lock_unlocks() -> None:
    c = Cluster(4)
    core = c.core(0)
    core.start()
    b = c.block(1)
    core.receive(c.proposal(b), c.ids[1])
    core.receive(c.vote(1, PREVOTE, 0, b), c.ids[1])
    core.receive(c.vote(2, PREVOTE, 0, b), c.ids[2])
    assert core.locked_round == 0
    core.receive(c.vote(1, PRECOMMIT, 0, None), c.ids[1])
    core.receive(c.vote(2, PRECOMMIT, 0, None), c.ids[2])
    core.on_timeout("precommit", 1, 0)
    # Round 1: x is proposed; we are locked on b (nil), and our prevote timeout
    # fires before x's 2f+1 prevotes arrive.
    x = c.block(1, proposer=2, decisions=(b"x2",))
    effects = core.receive(c.proposal(x, 1), c.ids[2])
    assert [v.block_id for v in own_votes(effects, core)] == [None]
    core.receive(c.vote(1, PREVOTE, 1, x), c.ids[1])
    assert timeouts(core.receive(c.vote(2, PREVOTE, 1, x), c.ids[2]), "prevote")
    core.on_timeout("prevote", 1, 1)
    assert core.step == "precommit"
    core.receive(c.vote(3, PREVOTE, 1, x), c.ids[3])
    assert (core.locked_round, core.valid_round) == (0, 1)  # no re-lock after precommitting
    core.receive(c.vote(1, PRECOMMIT, 1, x), c.ids[1])
    core.receive(c.vote(2, PRECOMMIT, 1, x), c.ids[2])
    core.on_timeout("precommit", 1, 1)
    # Round 2: x with valid round 1 >= our locked round 0: prevote x.
    effects = core.receive(c.proposal(x, 2, valid_round=1), c.ids[3])
    assert [v.block_id for v in own_votes(effects, core)] == [x.id]


def test_reproposal_without_its_proof_of_lock_waits_for_the_timeout() -> None:
    c = Cluster(4)
    core = c.core(0)
    core.start()
    for i in (1, 2):
        core.receive(c.vote(i, PRECOMMIT, 1, None), c.ids[i])
    x = c.block(1, proposer=2)
    effects = core.receive(c.proposal(x, 1, valid_round=0), c.ids[2])
    assert not own_votes(effects, core) and core.step == "propose"
    effects = core.on_timeout("propose", 1, 1)
    assert [v.block_id for v in own_votes(effects, core)] == [None]


def test_round_skip_needs_f_plus_one() -> None:
    c = Cluster(4)
    core = c.core(1)
    core.start()
    core.receive(c.vote(0, PREVOTE, 3, None), c.ids[0])
    core.receive(c.vote(0, PRECOMMIT, 3, None), c.ids[0])  # still one validator
    core.receive(c.vote(2, PRECOMMIT, 5, None), c.ids[2])
    assert core.round == 0
    effects = core.receive(c.vote(3, PREVOTE, 3, None), c.ids[3])
    assert (core.round, core.step) == (3, "propose")
    assert timeouts(effects, "propose") == [ScheduleTimeout("propose", 1, 3, 1.75)]
    assert core.on_timeout("propose", 1, 0) == []  # stale


def test_timeouts_move_through_the_steps_and_rounds() -> None:
    c = Cluster(4)
    core = c.core(0)
    effects = core.start()
    assert timeouts(effects, "propose") == [ScheduleTimeout("propose", 1, 0, 1.0)]
    assert core.on_timeout("prevote", 1, 0) == []  # not in that step
    effects = core.on_timeout("propose", 1, 0)
    assert [(v.type, v.block_id) for v in own_votes(effects, core)] == [(PREVOTE, None)]
    core.receive(c.vote(1, PREVOTE, 0, c.block(1)), c.ids[1])
    effects = core.receive(c.vote(2, PREVOTE, 0, None), c.ids[2])  # 2f+1 of anything
    assert timeouts(effects, "prevote") == [ScheduleTimeout("prevote", 1, 0, 0.5)]
    assert core.receive(c.vote(3, PREVOTE, 0, None), c.ids[3])  # now 2f+1 nil
    assert core.step == "precommit"
    assert core.on_timeout("prevote", 1, 0) == []
    core.receive(c.vote(1, PRECOMMIT, 0, c.block(1)), c.ids[1])
    effects = core.receive(c.vote(2, PRECOMMIT, 0, None), c.ids[2])
    assert timeouts(effects, "precommit") == [ScheduleTimeout("precommit", 1, 0, 0.5)]
    effects = core.on_timeout("precommit", 1, 0)
    assert (core.round, core.step) == (1, "propose")
    assert timeouts(effects, "propose") == [ScheduleTimeout("propose", 1, 1, 1.25)]
    # A prevote timeout without 2f+1 nil: precommit nil.
    core.on_timeout("propose", 1, 1)
    core.on_timeout("prevote", 1, 1)
    assert core.step == "precommit"
    assert core.signing_state == SigningState(1, 1, 2, None)


def test_silent_proposer_leads_to_a_decision_in_round_one() -> None:
    c = Cluster(4)
    silent = c.proposer(1, 0)
    router = Router({c.ids[i]: c.core(i) for i in range(4) if i != silent})
    router.start()
    router.run(1)
    assert not any(router.decided.values())
    router.fire("propose", 1)  # everyone prevotes nil ...
    assert not any(router.pending[i] for i in router.cores if i[0] == "prevote")
    router.fire("precommit", 1)  # ... and moves to round 1, where the proposer is alive
    for decisions in router.decided.values():
        [d] = decisions
        assert (d.block.height, d.commit.round) == (1, 1)
        assert d.block.proposer == c.ids[c.proposer(1, 1)]
    assert len({d[0].block.id for d in router.decided.values()}) == 1


def test_bad_signature_vote_is_blamed_on_the_sender_and_not_counted() -> None:
    c = Cluster(4)
    core = c.core(0)
    core.start()
    forged = replace(c.vote(1, PREVOTE, 3, None), signature=bytes(64))
    assert of_type(core.receive(forged, c.ids[2]), Misbehaviour) == [
        Misbehaviour(c.ids[2], "vote with an invalid signature")]
    assert core.receive(forged) == []
    outsider = Vote(PREVOTE, 1, 3, None, validator_id(_raw(_key(99)))
                    ).signed(CHAIN, _key(99).sign)
    assert of_type(core.receive(outsider, "peer"), Misbehaviour) == [
        Misbehaviour("peer", "vote from a non-validator")]
    core.receive(c.vote(2, PREVOTE, 3, None), c.ids[2])
    assert core.round == 0  # the forged vote for round 3 did not count toward f+1


def test_votes_are_relayed_once() -> None:
    c = Cluster(4)
    core = c.core(0)
    core.start()
    vote = c.vote(1, PREVOTE, 0, None)
    assert broadcasts(core.receive(vote, c.ids[1])) == [vote]
    assert core.receive(vote, c.ids[2]) == []
    quiet = c.core(0, relay=False)
    quiet.start()
    assert broadcasts(quiet.receive(vote, c.ids[1])) == []


def test_gossip_resends_own_messages_and_everything_when_stuck() -> None:
    c = Cluster(4)
    assert c.core(0).gossip() == []  # nothing signed or known yet
    core = c.core(0)
    core.start()
    b = c.block(1)
    proposal = c.proposal(b)
    core.receive(proposal, c.ids[1])
    theirs = c.vote(1, PREVOTE, 0, b)
    core.receive(theirs, c.ids[1])
    first = broadcasts(core.gossip())
    [mine] = first  # while heights move: our own votes only, no block
    assert isinstance(mine, Vote) and mine.validator == core.me
    # Nothing moved since the last call: the proposal and every vote of the round too.
    assert broadcasts(core.gossip()) == [mine, proposal, theirs]
    core.receive(c.vote(2, PREVOTE, 0, b), c.ids[2])  # 2f+1: we precommit
    after = broadcasts(core.gossip())
    assert theirs not in after and proposal not in after and len(after) == 2
    assert all(isinstance(m, Vote) and m.validator == core.me for m in after)
    assert proposal in broadcasts(core.gossip())  # stuck again: the block goes out


def test_equivocator_counts_for_each_block_but_once_in_total() -> None:
    """A node that saw the faulty validator's nil prevote first must still see the
    2f+1 prevotes for b that an honest node locked on b saw (proof of lock)."""
    c = Cluster(4)
    core = c.core(0)
    core.start()
    b = c.block(1)
    core.on_timeout("propose", 1, 0)  # we prevote nil
    core.receive(c.vote(3, PREVOTE, 0, None), c.ids[3])
    effects = core.receive(c.vote(3, PREVOTE, 0, b), c.ids[1])  # 3 equivocates
    assert [type(e) for e in effects] == [EvidenceFound, Broadcast, Broadcast]
    core.receive(c.vote(1, PREVOTE, 0, b), c.ids[1])
    # Two nil (us, 3) and b from 1 and 3: no 2f+1 of nil, and 3 validators in all.
    assert core.step == "prevote" and core.status()["round"] == 0
    core.receive(c.vote(2, PREVOTE, 0, b), c.ids[2])
    core.on_timeout("prevote", 1, 0)
    core.receive(c.vote(1, PRECOMMIT, 1, None), c.ids[1])
    core.receive(c.vote(2, PRECOMMIT, 1, None), c.ids[2])
    assert core.round == 1
    # Round 1's proposer re-proposes b with valid round 0: 1, 2, 3 prevoted b there.
    effects = core.receive(c.proposal(b, 1, valid_round=0), c.ids[2])
    assert [v.block_id for v in own_votes(effects, core)] == [b.id]


# --- evidence and isolation ---------------------------------------------------------------------


def test_duplicate_prevote_is_evidence_at_once_and_goes_into_our_next_block() -> None:
    c = Cluster(4)
    core = c.core(0)  # proposer of round 3
    core.start()
    first = c.vote(2, PREVOTE, 0, c.block(1))
    second = c.vote(2, PREVOTE, 0, None)
    core.receive(first, c.ids[2])
    effects = core.receive(second, c.ids[2])
    evidence = DuplicateVoteEvidence.of(first, second)
    assert effects == [EvidenceFound(evidence), Broadcast(evidence), Broadcast(second)]
    assert core.pending_evidence == [evidence]
    assert core.receive(second, c.ids[1]) == []  # seen
    assert core.receive(evidence, c.ids[1]) == []  # already pending
    assert broadcasts(core.gossip(), DuplicateVoteEvidence) == [evidence]
    effects = []
    for i in (1, 3):  # f+1 of round 3: we skip to it, and propose (its proposer)
        effects += core.receive(c.vote(i, PREVOTE, 3, None), c.ids[i])
    [proposal] = [m for m in broadcasts(effects, Proposal)]
    assert isinstance(proposal, Proposal) and proposal.round == 3
    assert proposal.block.evidence == (evidence,)


def test_received_evidence_is_verified() -> None:
    c = Cluster(4)
    core = c.core(0)
    core.start()
    good = c.evidence(3)
    forged = replace(good, vote_b=replace(good.vote_b, signature=bytes(64)))
    same = DuplicateVoteEvidence(c.vote(3, PRECOMMIT, 0, c.block(1), extension=b"1"),
                                 c.vote(3, PRECOMMIT, 0, c.block(1), extension=b"2"))
    outsider = _key(42)
    stranger = [Vote(PREVOTE, 1, 0, block_id, validator_id(_raw(outsider))
                     ).signed(CHAIN, outsider.sign) for block_id in (None, bytes(32))]
    for bad, reason in ((forged, "signature"), (same, "do not conflict"),
                        (DuplicateVoteEvidence.of(*stranger), "not a validator")):
        [blame] = core.receive(bad, c.ids[1])
        assert isinstance(blame, Misbehaviour) and blame.validator == c.ids[1]
        assert reason in blame.reason
        assert core.receive(bad) == []
    assert core.pending_evidence == []
    assert core.receive(good, c.ids[1]) == [EvidenceFound(good), Broadcast(good)]
    assert core.pending_evidence == [good]


def _decide_with_evidence(n: int, offenders: list[int]) -> tuple[Cluster, Router]:
    c = Cluster(n)
    router = Router({c.ids[i]: c.core(i) for i in range(n)})
    proposer = router.cores[c.ids[c.proposer(1, 0)]]
    for offender in offenders:
        assert of_type(proposer.receive(c.evidence(offender)), EvidenceFound)
    router.start()
    router.run(1)
    return c, router


def test_seven_validators_isolate_an_equivocator() -> None:
    c, router = _decide_with_evidence(7, [5])
    for decisions in router.decided.values():
        [d] = decisions
        assert [e.offender for e in d.block.evidence] == [c.ids[5]]
        assert d.isolated == (c.ids[5],) and d.refused_isolation == ()
        assert d.validators.by_id[c.ids[5]].power == 0
    core = router.cores[c.ids[0]]
    assert core.validators.by_id[c.ids[5]].power == 0 and core.pending_evidence == []
    assert c.ids[5] not in {core.validators.proposer(2, r) for r in range(7)}
    # Its messages are ignored now: not counted, not relayed, not blamed.
    assert core.receive(c.vote(5, PREVOTE, 4, None, height=2), c.ids[5]) == []
    core.receive(c.vote(1, PREVOTE, 4, None, height=2), c.ids[1])
    core.receive(c.vote(2, PREVOTE, 4, None, height=2), c.ids[2])
    assert core.round == 0  # 1 and 2 hold 2 of 6: with 5, that would be f+1
    # Its evidence is committed: a block carrying it again is invalid.
    d = router.decided[c.ids[0]][0]
    proposer = core.validators.proposer(2, 1)
    again = Block(height=2, previous=d.block.id, time_ms=d.block.time_ms + 1,
                  proposer=proposer, evidence=(c.evidence(5),))
    effects = core.receive(Proposal(2, 1, again, -1, proposer).signed(
        CHAIN, c.keys[c.ids.index(proposer)].sign), proposer)
    assert any("already committed" in m.reason for m in of_type(effects, Misbehaviour))


def test_isolation_stops_at_four_active_validators() -> None:
    _, router = _decide_with_evidence(4, [2])
    d = next(iter(router.decided.values()))[0]
    assert d.isolated == () and len(d.refused_isolation) == 1
    assert d.validators.by_id[d.refused_isolation[0]].power == 1
    c, router = _decide_with_evidence(5, [1, 3])
    d = next(iter(router.decided.values()))[0]
    assert d.isolated == (min(c.ids[1], c.ids[3]),)
    assert d.refused_isolation == (max(c.ids[1], c.ids[3]),)
    c, router = _decide_with_evidence(7, [1, 3])
    d = next(iter(router.decided.values()))[0]
    assert set(d.isolated) == {c.ids[1], c.ids[3]} and len(d.validators.active) == 5


def test_messages_from_isolated_validators_are_ignored() -> None:
    c = Cluster(5)
    validators = c.validators.isolate([c.ids[4]])
    core = c.core(0, validators=validators)
    core.start()
    for i in (3, 4):
        assert core.receive(c.vote(4, PREVOTE, 2, None, height=i - 2), c.ids[4]) == []
    assert core.receive(c.vote(4, PREVOTE, 0, None), c.ids[4]) == []
    core.receive(c.vote(1, PREVOTE, 2, None), c.ids[1])
    assert core.round == 0


# --- restarts and catching up -------------------------------------------------------------------


def test_signing_state_stops_a_restarted_node_from_double_signing() -> None:
    c = Cluster(4)
    core = c.core(0)
    core.start()
    b = c.block(1)
    effects = core.receive(c.proposal(b), c.ids[1])
    [persisted] = of_type(effects, PersistSigningState)
    [prevote] = own_votes(effects, core)
    # Crash; restart from the persisted state: it rejoins round 0 having prevoted,
    # and re-sends the very same prevote (same bytes, same signature) ...
    restarted = c.core(0, signing_state=persisted.state)
    effects = restarted.start()
    assert own_votes(effects, restarted) == [prevote]
    assert restarted.step == "prevote"
    # ... but signs nothing else for that step, whatever it is shown.
    other = c.block(1, decisions=(b"other",))
    assert own_votes(restarted.receive(c.proposal(other), c.ids[1]), restarted) == []
    assert restarted.on_timeout("propose", 1, 0) == []
    # A later step is fine.
    effects = restarted.on_timeout("prevote", 1, 0)
    assert [(v.type, v.block_id) for v in own_votes(effects, restarted)] == [(PRECOMMIT, None)]


def test_signing_state_is_checked_before_every_signature() -> None:
    c = Cluster(4)
    b = c.block(1)
    # A proposer restarted after proposing b at (1, 0) does not propose another block.
    proposer = c.proposer(1, 0)
    restarted = c.core(proposer, signing_state=SigningState(1, 0, 0, b.id))
    effects = restarted.start()
    assert broadcasts(effects) == [] and timeouts(effects, "propose")
    # It still prevotes its own proposal when it sees it again.
    effects = restarted.receive(c.proposal(b), c.ids[0])
    assert [v.block_id for v in own_votes(effects, restarted)] == [b.id]
    # A state ahead of the core (say, written by another process with the key) wins.
    core = c.core(0)
    core.start()
    core.signing_state = SigningState(1, 0, 1, b.id)
    other = c.block(1, decisions=(b"other",))
    effects = core.receive(c.proposal(other), c.ids[1])
    assert own_votes(effects, core) == [] and not of_type(effects, PersistSigningState)
    assert core.step == "prevote"


def test_restarted_after_precommit_keeps_its_lock_and_resends_it() -> None:
    c = Cluster(4)
    core = c.core(0)
    core.start()
    b = c.block(1)
    core.receive(c.proposal(b), c.ids[1])
    core.receive(c.vote(1, PREVOTE, 0, b), c.ids[1])
    effects = core.receive(c.vote(2, PREVOTE, 0, b), c.ids[2])
    [precommit] = own_votes(effects, core)
    # A state written before locks and blocks were persisted: the precommit is the lock.
    restarted = c.core(0, signing_state=SigningState(*_last_signed(core.signing_state)))
    assert own_votes(restarted.start(), restarted) == []  # needs the block (extension)
    assert (restarted.locked_round, restarted.step) == (0, "precommit")
    assert own_votes(restarted.receive(c.proposal(b), c.ids[1]), restarted) == [precommit]
    # Locked on b: a fresh proposal in a later round gets nil.
    for i in (1, 2):
        restarted.receive(c.vote(i, PRECOMMIT, 1, None), c.ids[i])
    other = c.block(1, proposer=2, decisions=(b"other",))
    effects = restarted.receive(c.proposal(other, 1), c.ids[2])
    assert [v.block_id for v in own_votes(effects, restarted)] == [None]


def _stored(state: SigningState) -> SigningState:
    """``state`` as a driver stores it and reads it back."""
    return SigningState.from_wire(decode_item(encode_deterministic(state.to_wire())))


def _locked_then_nil_precommit(c: Cluster) -> tuple[Tendermint, Block]:
    """Validator 0 locks on b in round 0 (precommits it), then in round 1 prevotes nil
    (locked) on a fresh block and precommits nil: its last signature says nothing of b."""
    core = c.core(0)
    core.start()
    b = c.block(1)
    core.receive(c.proposal(b), c.ids[1])
    core.receive(c.vote(1, PREVOTE, 0, b), c.ids[1])
    effects = core.receive(c.vote(2, PREVOTE, 0, b), c.ids[2])
    assert [(v.type, v.block_id) for v in own_votes(effects, core)] == [(PRECOMMIT, b.id)]
    for i in (1, 2):
        core.receive(c.vote(i, PRECOMMIT, 0, None), c.ids[i])
    core.on_timeout("precommit", 1, 0)
    fresh = c.block(1, proposer=2, decisions=(b"fresh",))
    effects = core.receive(c.proposal(fresh, 1), c.ids[2])
    assert [v.block_id for v in own_votes(effects, core)] == [None]
    effects = core.on_timeout("prevote", 1, 1)
    assert [(v.type, v.block_id) for v in own_votes(effects, core)] == [(PRECOMMIT, None)]
    _signed_then_persisted(effects, core.me)
    return core, b


def test_signing_state_records_the_lock_and_the_locked_block() -> None:
    c = Cluster(4)
    core, b = _locked_then_nil_precommit(c)
    state = core.signing_state
    assert _last_signed(state) == (1, 1, 2, None)
    assert (state.locked_round, state.locked_block_id, state.locked_block) == (0, b.id, b.encoded)
    assert (state.valid_round, state.valid_block_id, state.valid_block) == (0, b.id, None)
    assert _stored(state) == state
    # A later polka for another block (seen after precommitting) moves only the valid
    # value: persisted at once, with that block's bytes too.
    x = c.block(1, proposer=2, decisions=(b"fresh",))
    for i in (1, 2):
        core.receive(c.vote(i, PREVOTE, 1, x), c.ids[i])
    effects = core.receive(c.vote(3, PREVOTE, 1, x), c.ids[3])
    [persisted] = of_type(effects, PersistSigningState)
    state = persisted.state
    assert _last_signed(state) == (1, 1, 2, None) and state.locked_round == 0
    assert (state.valid_round, state.valid_block_id, state.valid_block) == (1, x.id, x.encoded)
    assert _stored(state) == state
    # The next height's first signature drops them.
    core.receive(CommitMessage(x, c.commit(x, (1, 2, 3), round=1)), c.ids[1])
    effects = core.on_timeout("propose", 2, 0)
    [persisted] = of_type(effects, PersistSigningState)
    assert persisted.state == SigningState(2, 0, 1, None)


@pytest.mark.parametrize("with_block", [True, False])
def test_restart_after_a_later_nil_precommit_keeps_the_lock(with_block: bool) -> None:
    """No amnesia: the restarted validator stays locked on b though its last signature
    is a nil precommit; with b's bytes (persisted, or seen again) it re-proposes b."""
    c = Cluster(4)
    core, b = _locked_then_nil_precommit(c)
    stored = _stored(core.signing_state)
    if not with_block:  # locked on a block it does not have (yet)
        stored = replace(stored, locked_block=None)
    y = c.block(1, proposer=3, decisions=(b"y",))

    def restart(state: SigningState) -> Tendermint:
        restarted = c.core(0, signing_state=state)
        effects = restarted.start()
        assert [(v.type, v.round, v.block_id) for v in own_votes(effects, restarted)] == [
            (PRECOMMIT, 1, None)]
        for i in (1, 2):  # f+1 in round 2
            restarted.receive(c.vote(i, PRECOMMIT, 2, None), c.ids[i])
        assert restarted.round == 2
        return restarted

    # Without the lock in its state (as before it was persisted), it prevotes y: amnesia.
    forgetful = restart(SigningState(*_last_signed(stored)))
    effects = forgetful.receive(c.proposal(y, 2), c.ids[3])
    assert [v.block_id for v in own_votes(effects, forgetful)] == [y.id]
    # With it: still locked on b from round 0, so a fresh block in round 2 gets nil.
    restarted = restart(stored)
    assert (restarted.locked_round, restarted.valid_round) == (0, 0)
    effects = restarted.receive(c.proposal(y, 2), c.ids[3])
    assert [v.block_id for v in own_votes(effects, restarted)] == [None]
    assert restarted.signing_state.locked_block_id == b.id
    if not with_block:
        assert restarted.signing_state.locked_block is None
        # b's round-0 proposal comes by (gossip): the block is learned and persisted.
        effects = restarted.receive(c.proposal(b), c.ids[1])
        [persisted] = of_type(effects, PersistSigningState)
        assert persisted.state.locked_block == b.encoded and not own_votes(effects, restarted)
    # Round 3 is ours: we re-propose b as our valid value, with its valid round.
    restarted.receive(c.vote(1, PRECOMMIT, 3, None), c.ids[1])
    effects = restarted.receive(c.vote(2, PRECOMMIT, 3, None), c.ids[2])
    assert restarted.round == 3
    [proposal] = broadcasts(effects, Proposal)
    assert isinstance(proposal, Proposal)
    assert (proposal.round, proposal.block, proposal.valid_round) == (3, b, 0)
    _signed_then_persisted(effects, restarted.me)


def test_a_later_proof_of_lock_unlocks_a_restarted_validator() -> None:
    c = Cluster(4)
    core, _ = _locked_then_nil_precommit(c)
    restarted = c.core(0, signing_state=replace(_stored(core.signing_state), locked_block=None))
    restarted.start()
    x = c.block(1, proposer=2, decisions=(b"x",))
    for i in (1, 2, 3):  # 2f+1 prevotes for x in round 2, whose proposal we missed
        restarted.receive(c.vote(i, PREVOTE, 2, x), c.ids[i])
    assert restarted.round == 2
    restarted.on_timeout("propose", 1, 2)
    restarted.on_timeout("prevote", 1, 2)
    for i in (1, 2):
        restarted.receive(c.vote(i, PRECOMMIT, 2, None), c.ids[i])
    restarted.on_timeout("precommit", 1, 2)
    assert (restarted.round, restarted.locked_round) == (3, 0)
    # Round 3 (ours: we have no block of a lock to re-propose, so a fresh one gets nil).
    restarted.on_timeout("propose", 1, 3)
    restarted.on_timeout("prevote", 1, 3)
    for i in (1, 2):
        restarted.receive(c.vote(i, PRECOMMIT, 3, None), c.ids[i])
    restarted.on_timeout("precommit", 1, 3)
    # Round 4: x with valid round 2 >= our locked round 0, and its proof of lock: x.
    effects = restarted.receive(c.proposal(x, 4, valid_round=2), c.ids[1])
    assert not of_type(effects, Misbehaviour)
    [vote] = own_votes(effects, restarted)
    assert (vote.round, vote.block_id) == (4, x.id)


def _precommitted_but_undecided(c: Cluster) -> tuple[Router, bytes]:
    """Every validator precommits the same block, and every precommit is lost."""
    router = Router({c.ids[i]: c.core(i) for i in range(4)},
                    drop=lambda src, dst, m: isinstance(m, Vote) and m.type is PRECOMMIT)
    router.start()
    router.run(1)
    assert not any(router.decided.values())
    states = [core.signing_state for core in router.cores.values()]
    [block_id] = {s.block_id for s in states}
    assert block_id is not None
    assert all(s.step == 2 and s.locked_block_id == block_id for s in states)
    return router, block_id


def test_a_whole_cluster_restarted_after_precommitting_decides_the_locked_block() -> None:
    c = Cluster(4)
    before, block_id = _precommitted_but_undecided(c)
    states = {i: _stored(core.signing_state) for i, core in before.cores.items()}
    # Had only the ids been persisted, nobody would have b any more: none could re-send
    # its precommit (which needs b), and the height would stall, timeouts or not.
    stuck = Router({i: c.core(c.ids.index(i), signing_state=replace(s, locked_block=None))
                    for i, s in states.items()})
    stuck.start()
    stuck.run(1)
    steps: tuple[Step, ...] = ("propose", "prevote", "precommit")
    for step in steps * 3:
        stuck.fire(step, 1)
    assert not any(stuck.decided.values())
    # With them, each re-learns b and re-sends the very same precommit: b is decided.
    router = Router({i: c.core(c.ids.index(i), signing_state=s) for i, s in states.items()})
    router.start()
    router.run(1)
    for i, decisions in router.decided.items():
        d = decisions[0]
        assert (d.block.id, d.commit.round) == (block_id, 0)
        d.commit.verify(CHAIN, c.validators)
        assert own_votes(router.effects[i], router.cores[i])[0] in own_votes(
            before.effects[i], before.cores[i])
        _signed_then_persisted(router.effects[i], i)
    router.run(3)  # and the chain goes on
    assert all(core.height > 3 for core in router.cores.values())


def test_signing_state_wire_is_backward_compatible_and_checked() -> None:
    c = Cluster(4)
    b = c.block(1)
    old = {"height": 3, "round": 1, "step": 2, "block_id": b.id}
    assert SigningState.from_wire(old) == SigningState(3, 1, 2, b.id)
    assert SigningState(3, 1, 2, b.id).to_wire() == old  # no lock: encoded as before
    locked = SigningState(1, 2, 1, None, locked_round=1, locked_block_id=b.id,
                          locked_block=b.encoded, valid_round=1, valid_block_id=b.id)
    assert SigningState.from_wire(locked.to_wire()) == locked
    assert SigningState(1, 0, 1, b.id, 0, b.id).to_wire()["locked_round"] == 0
    for garbage in ([], {"height": 1, "round": 0}, {**old, "height": -1},
                    {**old, "step": 3}, {**old, "round": True}, {**old, "block_id": b"x"},
                    {**old, "locked_round": 0}, {**old, "locked_block_id": b.id},
                    {**old, "valid_round": "0", "valid_block_id": b.id},
                    {**locked.to_wire(), "locked_block": b"not cbor"},
                    {**locked.to_wire(), "locked_block": c.block(1, time_ms=7).encoded},
                    {**locked.to_wire(), "height": 2},
                    {**locked.to_wire(), "valid_block": 5}):
        with pytest.raises(ValueError, match="signing state"):
            SigningState.from_wire(garbage)


def _decided_height_one(c: Cluster) -> tuple[Block, Commit]:
    block = c.block(1)
    return block, c.commit(block, (0, 1, 2))


def test_peer_behind_once_per_validator_and_height_between_gossips() -> None:
    c = Cluster(4)
    block, _ = _decided_height_one(c)
    core = c.core(0, height=2, previous=block)
    core.start()
    old = c.vote(3, PRECOMMIT, 0, block)
    assert core.receive(old, c.ids[3]) == [PeerBehind(c.ids[3], 1)]
    assert core.receive(c.vote(3, PREVOTE, 0, block), c.ids[3]) == []
    assert core.receive(c.vote(1, PREVOTE, 0, block)) == [PeerBehind(c.ids[1], 1)]
    forged = replace(c.vote(2, PREVOTE, 0, None), signature=bytes(64))
    assert of_type(core.receive(forged, c.ids[2]), PeerBehind) == []
    core.gossip()
    assert core.receive(old, c.ids[3]) == [PeerBehind(c.ids[3], 1)]  # again, may be lost


def test_commit_message_catches_up() -> None:
    c = Cluster(4)
    block, commit = _decided_height_one(c)
    core = c.core(3)
    core.start()
    short = Commit(1, 0, block.id, commit.precommits[:2])
    [blame] = core.receive(CommitMessage(block, short), c.ids[1])
    assert isinstance(blame, Misbehaviour) and "2/3" in blame.reason
    wrong = c.block(1, previous=b"\x02" * 32)
    [blame] = core.receive(CommitMessage(wrong, c.commit(wrong, (0, 1, 2))), c.ids[1])
    assert isinstance(blame, Misbehaviour) and "extend" in blame.reason
    assert core.height == 1
    effects = core.receive(CommitMessage(block, commit), c.ids[1])
    [decided] = of_type(effects, Decided)
    assert (decided.block, decided.commit) == (block, commit)
    assert core.height == 2 and core.round == 0
    assert core.receive(CommitMessage(block, commit), c.ids[1]) == []  # past: ignored


def test_commit_for_a_higher_height_asks_for_blocks() -> None:
    c = Cluster(4)
    b1, _ = _decided_height_one(c)
    b2 = c.block(2, previous=b1.id)
    b3 = c.block(3, previous=b2.id)
    core = c.core(0)
    core.start()
    assert core.receive(CommitMessage(b3, c.commit(b3, (0,)))) == []  # no honest signer
    effects = core.receive(CommitMessage(b3, c.commit(b3, (1, 2))), c.ids[2])
    assert effects == [NeedBlocks(c.ids[2], 1)]
    assert core.receive(CommitMessage(b3, c.commit(b3, (1, 2))), c.ids[2]) == []


def test_f_plus_one_seen_above_our_height_asks_for_blocks() -> None:
    c = Cluster(4)
    core = c.core(0)
    core.start()
    assert core.receive(c.vote(1, PREVOTE, 0, None, height=9), c.ids[1]) == []
    assert core.receive(c.vote(2, PREVOTE, 0, None, height=9), c.ids[2]) == [
        NeedBlocks(c.ids[2], 1)]
    assert core.receive(c.vote(3, PREVOTE, 0, None, height=9), c.ids[3]) == []  # asked
    assert core.status()["buffered"] == 0  # too far ahead to keep
    assert NeedBlocks(c.ids[3], 1) in core.gossip()  # retried while it lasts


def test_future_messages_are_buffered_boundedly_and_replayed() -> None:
    c = Cluster(4)
    b1, commit = _decided_height_one(c)
    b2 = c.block(2, previous=b1.id)
    core = c.core(0)
    core.start()
    assert core.receive(c.proposal(b2), c.ids[c.proposer(2, 0)]) == []
    core.receive(c.vote(1, PREVOTE, 0, b2, height=2), c.ids[1])
    core.receive(c.vote(1, PREVOTE, 0, b2, height=2), c.ids[1])  # a duplicate
    assert core.status()["buffered"] == 2
    for r in range(100):
        core.receive(c.vote(2, PREVOTE, r, None, height=3), c.ids[2])
    assert core.status()["buffered"] == 2 + MAX_BUFFERED_PER_VALIDATOR
    core.receive(c.vote(1, PREVOTE, 0, None, height=4), c.ids[1])  # h+3: dropped
    assert core.status()["buffered"] == 2 + MAX_BUFFERED_PER_VALIDATOR
    effects = core.receive(CommitMessage(b1, commit), c.ids[1])
    assert core.height == 2
    # The buffered proposal made us prevote at once; 1's prevote was replayed (relayed).
    assert [(v.height, v.block_id) for v in own_votes(effects, core)] == [(2, b2.id)]
    assert c.vote(1, PREVOTE, 0, b2, height=2) in broadcasts(effects, Vote)
    assert core.status()["buffered"] == MAX_BUFFERED_PER_VALIDATOR


def test_observer_follows_without_signing() -> None:
    c = Cluster(4)
    cores = {c.ids[i]: c.core(i) for i in range(4)}
    cores["observer"] = c.core(None)
    router = Router(cores)
    router.start()
    router.run(1)
    [d] = router.decided["observer"][:1]
    assert d.block == router.decided[c.ids[0]][0].block
    sent = broadcasts(router.effects["observer"])
    assert not of_type(router.effects["observer"], PersistSigningState)
    assert sent and all(isinstance(m, Vote) and m.validator in c.ids for m in sent)
