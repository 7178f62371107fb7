"""The Tendermint state machine (Buchman, Kwon, Milosevic 2018, Algorithm 1), sans I/O.

A :class:`Tendermint` instance is one validator (or observer) of one chain. It
never touches a socket, a clock or a file: the driver feeds it messages
(:meth:`Tendermint.receive`), fired timeouts (:meth:`Tendermint.on_timeout`)
and a periodic :meth:`Tendermint.gossip`, and performs the effects each call
returns, in order. That keeps the algorithm testable by hand and by a seeded
simulation (``_sim``), and lets the STOQ driver stay thin.

The paper's ``upon`` rules are re-evaluated after every input until none
fires (:meth:`Tendermint._run`); each rule's guard includes a state change
(step, round, height or a "first time" flag), so this always terminates.
Quorums are counted by voting power. A second, different vote from a
validator for the same round and type becomes :class:`DuplicateVoteEvidence`
at once; it counts once in "2f+1 of anything" but also for its own block (see
:class:`_VoteSet` for why), and is relayed like any new vote so that every
honest node sees what the others saw.

Beyond Algorithm 1, the core buffers messages for the next heights, reports
peers that are behind (:class:`PeerBehind`) and catches up from commits
(:class:`CommitMessage`, :class:`NeedBlocks`), turns equivocation into
evidence and evidence into isolation, and never signs what its persisted
:class:`SigningState` does not allow. That state also holds the lock and valid
value (with their blocks), so that a restarted validator neither forgets its
lock (an amnesia fault) nor the block it locked on (which, if every validator
restarts at once, nobody else may have any more).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from ._types import (
    GENESIS_ID,
    MAX_EVIDENCE,
    BadMessage,
    Block,
    Commit,
    CommitMessage,
    DuplicateVoteEvidence,
    Message,
    Proposal,
    SigningState,
    ValidatorSet,
    Vote,
    VoteType,
)

Step = Literal["propose", "prevote", "precommit"]

_STEP_ORDER: dict[Step, int] = {"propose": 0, "prevote": 1, "precommit": 2}

MIN_ACTIVE = 4
"""Isolation never leaves fewer active validators than this (3f+1 with f = 1)."""
FUTURE_HEIGHTS = 2
"""Messages for heights ``h+1 .. h+FUTURE_HEIGHTS`` are buffered and replayed."""
MAX_BUFFERED_PER_VALIDATOR = 32
"""Buffered messages per signer per future height (a validator sends about 3 per round)."""
ROUND_WINDOW = 1000
"""Messages for rounds more than this far ahead of ours are dropped (bounds memory)."""
MAX_PROPOSALS_PER_ROUND = 4
"""Distinct proposals kept per round; more than one is already misbehaviour."""
MAX_VOTES_PER_SLOT = 4
"""Distinct votes kept per validator, round and type (more than one is equivocation)."""


@dataclass(frozen=True)
class Timeouts:
    """Round timeouts in seconds; each grows by ``delta`` per round so that, after
    the network stabilises, some round is long enough for every honest validator."""

    propose: float = 1.0
    prevote: float = 0.5
    precommit: float = 0.5
    delta: float = 0.25

    def of(self, step: Step, round: int) -> float:
        base = {"propose": self.propose, "prevote": self.prevote,
                "precommit": self.precommit}[step]
        return base + round * self.delta


# --- effects ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Broadcast:
    """Send ``message`` to every other validator."""

    message: Message


@dataclass(frozen=True)
class SendTo:
    """Send ``message`` to one validator."""

    validator: str
    message: Message


@dataclass(frozen=True)
class ScheduleTimeout:
    """Call :meth:`Tendermint.on_timeout` with these arguments after ``delay`` seconds."""

    step: Step
    height: int
    round: int
    delay: float


@dataclass(frozen=True)
class PersistSigningState:
    """Make ``state`` durable (fsync) before performing any later effect."""

    state: SigningState


@dataclass(frozen=True)
class Decided:
    """``block`` is final at its height; ``validators`` is the set for the next height."""

    block: Block
    commit: Commit
    validators: ValidatorSet
    isolated: tuple[str, ...]
    refused_isolation: tuple[str, ...]


@dataclass(frozen=True)
class Diverged:
    """A quorum decided ``block`` although it carries a state hash other than ours: this
    validator's state is not the cluster's. It stops signing from here on."""

    block: Block
    ours: bytes


@dataclass(frozen=True)
class EvidenceFound:
    """Equivocation proven for the first time here (found locally, or received and verified)."""

    evidence: DuplicateVoteEvidence


@dataclass(frozen=True)
class Misbehaviour:
    """Attributable misbehaviour that is not (or not yet) committed evidence."""

    validator: str
    reason: str


@dataclass(frozen=True)
class PeerBehind:
    """``validator`` sent a message for ``height``, which we decided: it may need the commit.

    At most once per validator and height between two :meth:`Tendermint.gossip`
    calls (so that a lost commit is sent again, but not once per message)."""

    validator: str
    height: int


@dataclass(frozen=True)
class NeedBlocks:
    """Others are past our height: fetch decided blocks from ``from_height`` on."""

    validator: str
    from_height: int


Effect = (Broadcast | SendTo | ScheduleTimeout | PersistSigningState | Decided | Diverged
          | EvidenceFound | Misbehaviour | PeerBehind | NeedBlocks)


class Application(Protocol):
    """What the core asks of the replicated application."""

    def proposal(self, height: int, round: int) -> tuple[int, tuple[bytes, ...]] | None:
        """(time_ms, decisions) for a new block this node proposes. None means 'nothing to
        propose yet' and is only allowed at round 0; the core then waits until the driver
        calls Tendermint.content_available()."""

    def valid(self, block: Block) -> bool:
        """Application-level validity (decisions, time). The core has already checked
        height, previous, proposer is a validator, evidence."""

    def precommit_extension(self, block: Block) -> bytes:
        """Bytes to attach to this node's precommit for `block` (b'' for none)."""


# --- per-round bookkeeping ---------------------------------------------------------------------


@dataclass
class _VoteSet:
    """One round's votes of one type, tallied by power.

    ``total`` counts each validator once (the paper's ``2f+1 <PREVOTE, h, r, *>``);
    ``power[b]`` counts each validator that voted ``b`` once. An equivocating
    validator so counts for each block it voted (at most :data:`MAX_VOTES_PER_SLOT`):
    the paper counts messages, and an honest node locked on ``v`` can only
    convince the others with the very prevotes it saw, whichever of a faulty
    validator's votes they happened to receive first. Safety is unaffected: two
    quorums for different blocks would still need an honest validator in both.
    """

    votes: dict[str, dict[bytes | None, Vote]] = field(default_factory=dict)
    power: dict[bytes | None, int] = field(default_factory=dict)
    total: int = 0

    def has(self, vote: Vote) -> bool:
        return vote.block_id in self.votes.get(vote.validator, {})

    def first(self, validator: str) -> Vote | None:
        """The first vote we accepted from ``validator`` in this round (None if none)."""
        return next(iter(self.votes.get(validator, {}).values()), None)

    def add(self, vote: Vote, power: int) -> bool:
        """Count ``vote``; False if its validator already used up its votes here."""
        mine = self.votes.setdefault(vote.validator, {})
        if len(mine) >= MAX_VOTES_PER_SLOT:
            return False
        if not mine:
            self.total += power
        mine[vote.block_id] = vote
        self.power[vote.block_id] = self.power.get(vote.block_id, 0) + power
        return True

    def for_block(self, block_id: bytes) -> list[Vote]:
        return sorted((m[block_id] for m in self.votes.values() if block_id in m),
                      key=lambda v: v.validator)


@dataclass
class _Buffered:
    message: Proposal | Vote
    sender: str | None


_Outcome = Literal["proposed", "waiting", "none"]


class Tendermint:
    """One participant of a Tendermint chain: messages and timeouts in, effects out."""

    def __init__(self, *, chain_id: str, validators: ValidatorSet, app: Application,
                 me: str | None = None, sign: Callable[[bytes], bytes] | None = None,
                 height: int = 1, previous: Block | None = None,
                 signing_state: SigningState | None = None,
                 timeouts: Timeouts = Timeouts(), relay: bool = True,
                 committed_evidence: Iterable[bytes] = (),
                 app_hash: bytes = bytes(32), await_execution: bool = False) -> None:
        if height < 1:
            raise ValueError("heights start at 1")
        if (previous is None) != (height == 1):
            raise ValueError("`previous` is the decided block at height - 1 (None only at 1)")
        if previous is not None and previous.height != height - 1:
            raise ValueError(f"`previous` is at height {previous.height}, not {height - 1}")
        if (me is None) != (sign is None):
            raise ValueError("give both `me` and `sign`, or neither (an observer)")
        self.chain_id = chain_id
        self.validators = validators
        self.app = app
        self.me = me
        self._sign = sign
        self.height = height
        self._previous_id = GENESIS_ID if previous is None else previous.id
        self._previous_time = 0 if previous is None else previous.time_ms
        self.signing_state = replace(signing_state) if signing_state else SigningState()
        self.timeouts = timeouts
        self.relay = relay
        self._committed_evidence: set[bytes] = set(committed_evidence)
        self.pending_evidence: list[DuplicateVoteEvidence] = []
        self._behind_sent: set[tuple[str, int]] = set()
        self._heights_seen: dict[str, int] = {}
        """Highest height each validator (verified signer) has been seen at."""
        self._future: dict[int, list[_Buffered]] = {}
        self._future_count: dict[tuple[int, str], int] = {}
        self._future_keys: set[tuple[Any, ...]] = set()
        self._need_blocks_asked = 0
        self.app_hash = app_hash
        """The application's state hash after the last executed block."""
        self.await_execution = await_execution
        """True: after deciding a block, wait for :meth:`executed` (an application with
        state to update); False: the state hash never changes and the next height starts
        at once."""
        self.executing = False
        """A block was decided and the application is executing it: the next height
        starts when it says :meth:`executed`; messages wait until then."""
        self._held: list[tuple[CommitMessage, str | None]] = []
        self.diverged: Block | None = None
        """The decided block whose state hash was not ours (we stopped signing)."""
        self._reset_height()

    def _reset_height(self) -> None:
        """Forget everything about the previous height (Algorithm 1, lines 1-9 and 11)."""
        self.round = 0
        self.step: Step = "propose"
        self.locked_round = -1
        self.valid_round = -1
        self._locked_id: bytes | None = None
        self._locked_block: Block | None = None
        """The locked block, once known (after a restart we may know only its id)."""
        self._valid_id: bytes | None = None
        self._valid_value: Block | None = None
        """The valid block, once known (``_valid_id`` may be known alone after a restart)."""
        self._blocks: dict[bytes, Block] = {}
        """Every block of this height we know, by id: proposed, or restored after a restart."""
        self._resend_precommit: tuple[int, bytes] | None = None
        self._proposals: dict[int, dict[bytes, Proposal]] = {}
        self._prevotes: dict[int, _VoteSet] = {}
        self._precommits: dict[int, _VoteSet] = {}
        self._round_senders: dict[int, set[str]] = {}
        self._skip_rounds: set[int] = set()
        self._commit_rounds: dict[int, bytes] = {}
        self._validity: dict[bytes, bool] = {}
        self._own: list[Proposal | Vote] = []
        self._prevote_timeout_rounds: set[int] = set()
        self._precommit_timeout_rounds: set[int] = set()
        self._line36_rounds: set[int] = set()
        self._awaiting_content = False
        self._deferred: tuple[int, int] | None = None
        self._seen_evidence: set[bytes] = set()
        self._gossip_mark: tuple[int, int, Step] | None = None

    # --- public API -----------------------------------------------------------------------

    def start(self) -> list[Effect]:
        """StartRound(0) at the current height; or, for a validator restarted in the middle
        of a height, rejoin the round it last signed in (see :meth:`_restore`)."""
        out: list[Effect] = []
        state = self.signing_state
        if state.height == self.height and state.round >= 0 and self._can_sign:
            self._restore_lock(state)
            self._start_round(state.round, out)
            self._restore(state, out)
        else:
            self._start_round(0, out)
        self._run(out)
        return out

    def _restore_lock(self, state: SigningState) -> None:
        """Take back the lock and valid value of a height we were in before a restart
        (so that a restart is no amnesia), and re-learn their blocks if persisted.

        A precommit for a block is also a lock in its round (a state written before
        locks were persisted records only that). A restored block is not shown to
        the application again: it had 2f+1 prevotes, so at least f+1 honest
        validators (we among them) found it valid, and a driver may not have
        re-checked its decisions yet after a restart. Only its place in the chain
        is checked; a block that does not fit is forgotten, its id kept.
        """
        if state.locked_round >= 0 and state.locked_block_id is not None:
            self._locked_id, self.locked_round = state.locked_block_id, state.locked_round
        if state.valid_round >= 0 and state.valid_block_id is not None:
            self._valid_id, self.valid_round = state.valid_block_id, state.valid_round
        if state.step == 2 and state.block_id is not None and state.round > self.locked_round:
            self._locked_id, self.locked_round = state.block_id, state.round
        if self.locked_round > self.valid_round:
            self._valid_id, self.valid_round = self._locked_id, self.locked_round
        for block_id in dict.fromkeys((self._locked_id, self._valid_id)):
            block = state.block(block_id)
            if (block is not None and block.height == self.height
                    and block.previous == self._previous_id):
                self._validity[block.id] = True
                self._learn(block)

    def _learn(self, block: Block) -> bool:
        """Keep ``block`` if it is our locked or valid block whose bytes we lacked;
        True if it was one."""
        self._blocks.setdefault(block.id, block)
        learned = False
        if block.id == self._locked_id and self._locked_block is None:
            self._locked_block, learned = block, True
        if block.id == self._valid_id and self._valid_value is None:
            self._valid_value, learned = block, True
        return learned

    def _restore(self, state: SigningState, out: list[Effect]) -> None:
        """Rejoin the round and step we last signed in before a restart.

        Our last signed message is re-created (Ed25519 is deterministic: the same
        bytes and signature) and re-sent, as the others may be waiting for it. A
        precommit for a block needs the block (for its extension): it is re-sent
        at once if the block was restored, else as soon as a proposal shows it.
        """
        block = self._blocks.get(state.block_id) if state.block_id is not None else None
        if state.step == 2 and state.block_id is not None and block is None:
            self._resend_precommit = (state.round, state.block_id)  # once we see the block
        if state.step >= 1:
            kind = VoteType(state.step)
            self.step = "prevote" if kind is VoteType.PREVOTE else "precommit"
            if kind is VoteType.PREVOTE or state.block_id is None:
                self._sign_vote(kind, state.round, state.block_id, None, out)
            elif block is not None:
                self._sign_vote(kind, state.round, block.id, block, out)

    def receive(self, message: Message, sender: str | None = None) -> list[Effect]:
        """Handle one message; ``sender`` is the transport peer (for blame), if known."""
        out: list[Effect] = []
        if self.executing and not isinstance(message, DuplicateVoteEvidence):
            self._hold(message, sender, out)
            return out
        if isinstance(message, Vote):
            self._on_signed(message, message.validator, message.height, sender, out)
        elif isinstance(message, Proposal):
            self._on_signed(message, message.proposer, message.height, sender, out)
        elif isinstance(message, DuplicateVoteEvidence):
            self._on_evidence(message, sender, out)
        elif isinstance(message, CommitMessage):
            self._on_commit(message, sender, out)
        self._run(out)
        return out

    def on_timeout(self, step: Step, height: int, round: int) -> list[Effect]:
        """A timeout the core scheduled fired; stale ones (other height/round/step) are no-ops."""
        out: list[Effect] = []
        if height != self.height or round != self.round:
            return out
        if step == "propose" and self.step == "propose":
            if self._deferred == (height, round):
                self._deferred = None
                if self._propose(out) == "none":
                    self._schedule("propose", out)
            else:
                self._vote_and_step(VoteType.PREVOTE, None, out)  # line 57
        elif step == "prevote" and self.step == "prevote":
            self._vote_and_step(VoteType.PRECOMMIT, None, out)  # line 61
        elif step == "precommit":
            self._start_round(self.round + 1, out)  # line 65
        self._run(out)
        return out

    def content_available(self) -> list[Effect]:
        """The application has something to propose now: a waiting round-0 proposer asks again."""
        out: list[Effect] = []
        if self.executing:
            return out
        if self._awaiting_content and self.round == 0 and self.step == "propose":
            self._awaiting_content = False
            self._propose(out)
            self._run(out)
        return out

    def gossip(self) -> list[Effect]:
        """Re-send what others may have missed: our own votes of this height and pending
        evidence.

        If nothing moved since the last call (same height, round and step), also our
        proposal, the proposals we know for this round (and for our valid value), every
        vote we hold for this round and our valid round's prevotes: a peer may lack a
        vote whose signer crashed since, or a faulty validator's vote that it needs to
        see the quorum we saw. Proposals (whole blocks) wait for that: while heights
        move, every peer has them, and re-sending each block from every validator every
        interval would cost more than the decisions it carries.
        """
        if self.executing:
            return [Broadcast(e) for e in self.pending_evidence]
        mark = (self.height, self.round, self.step)
        stuck = mark == self._gossip_mark
        wanted: list[Message] = [m for m in self._own if stuck or not isinstance(m, Proposal)]
        if stuck:
            wanted += self._proposals.get(self.round, {}).values()
            if self._valid_value is not None:
                wanted += [p for p in self._proposals.get(self.valid_round, {}).values()
                           if p.block.id == self._valid_value.id]
            for votes in (self._prevotes.get(self.round), self._precommits.get(self.round),
                          self._prevotes.get(self.valid_round)):
                if votes is not None:
                    wanted += [v for mine in votes.votes.values() for v in mine.values()]
        self._gossip_mark = mark
        self._behind_sent.clear()  # PeerBehind again, in case the commit we sent was lost
        out: list[Effect] = []
        sent: set[int] = set()
        for message in wanted:
            if id(message) not in sent:
                sent.add(id(message))
                out.append(Broadcast(message))
        out += [Broadcast(e) for e in self.pending_evidence]
        ahead = self._ahead_of_us()
        if ahead is not None:
            out.append(NeedBlocks(ahead, self.height))
        return out

    def status(self) -> dict[str, Any]:
        """A snapshot for operators and tests."""
        return {"height": self.height, "round": self.round, "step": self.step,
                "locked_round": self.locked_round, "valid_round": self.valid_round,
                "proposer": self.validators.proposer(self.height, self.round),
                "pending_evidence": len(self.pending_evidence),
                "buffered": sum(len(b) for b in self._future.values()),
                "validators": {v.id: v.power for v in self.validators.validators}}

    # --- StartRound and proposing ------------------------------------------------------------

    @property
    def _can_sign(self) -> bool:
        validator = self.validators.by_id.get(self.me) if self.me is not None else None
        return (validator is not None and validator.power > 0 and self._sign is not None
                and self.diverged is None)

    def _schedule(self, step: Step, out: list[Effect]) -> None:
        out.append(ScheduleTimeout(step, self.height, self.round,
                                   self.timeouts.of(step, self.round)))

    def _start_round(self, round: int, out: list[Effect], *, after_decision: bool = False
                     ) -> None:
        """StartRound (lines 11-21)."""
        self.round = round
        self.step = "propose"
        self._awaiting_content = False
        self._deferred = None
        if not (self._can_sign and self.validators.proposer(self.height, round) == self.me):
            self._schedule("propose", out)
            return
        assert self.me is not None
        alone = self.validators.has_quorum(self.validators.power_of([self.me]))
        if after_decision and alone:
            # A validator that is a quorum by itself would otherwise decide height
            # after height within one call; let the driver come back for the next.
            self._deferred = (self.height, round)
            out.append(ScheduleTimeout("propose", self.height, round, 0.0))
            return
        if self._propose(out) == "none":
            self._schedule("propose", out)  # could not propose: behave as a non-proposer

    def _propose(self, out: list[Effect]) -> _Outcome:
        """Lines 14-19: re-propose our valid value, or ask the application for a block."""
        assert self.me is not None and self._sign is not None
        if self._valid_value is not None and self.valid_round < self.round:
            block, valid_round = self._valid_value, self.valid_round
        else:
            content = self.app.proposal(self.height, self.round)
            if content is None:
                if self.round == 0:
                    self._awaiting_content = True
                    return "waiting"
                return "none"
            time_ms, decisions = content
            block = Block(height=self.height, previous=self._previous_id,
                          time_ms=max(time_ms, self._previous_time + 1), proposer=self.me,
                          decisions=tuple(decisions), evidence=self._evidence_for_block(),
                          app_hash=self.app_hash)
            valid_round = -1
        if not self._may_sign(0, block.id, out):
            return "none"
        proposal = Proposal(self.height, self.round, block, valid_round, self.me
                            ).signed(self.chain_id, self._sign)
        out.append(Broadcast(proposal))
        self._own.append(proposal)
        self._accept_proposal(proposal, None, out, verified=True)
        return "proposed"

    def _evidence_for_block(self) -> tuple[DuplicateVoteEvidence, ...]:
        """Pending evidence worth committing: one per offender still holding power."""
        chosen: dict[str, DuplicateVoteEvidence] = {}
        for evidence in self.pending_evidence:
            offender = self.validators.by_id.get(evidence.offender)
            if (offender is not None and offender.power > 0 and evidence.offender not in chosen
                    and evidence.id not in self._committed_evidence):
                chosen[evidence.offender] = evidence
        return tuple(chosen.values())[:MAX_EVIDENCE]

    def _may_sign(self, step: int, block_id: bytes | None, out: list[Effect], *,
                  round: int | None = None) -> bool:
        """Double-sign protection: sign only what the persisted state allows, and persist
        the new state (PersistSigningState) before the signed message leaves."""
        round = self.round if round is None else round
        if not self.signing_state.allows(self.height, round, step, block_id):
            return False
        self.signing_state = self._state(round, step, block_id)
        out.append(PersistSigningState(replace(self.signing_state)))
        return True

    def _state(self, round: int, step: int, block_id: bytes | None) -> SigningState:
        """The signing state for a signature at (our height, ``round``, ``step``), with
        our lock and valid value (the valid block's bytes only if not the locked one)."""
        locked, valid = self._locked_block, self._valid_value
        return SigningState(
            self.height, round, step, block_id,
            locked_round=self.locked_round, locked_block_id=self._locked_id,
            locked_block=None if locked is None else locked.encoded,
            valid_round=self.valid_round, valid_block_id=self._valid_id,
            valid_block=(valid.encoded if valid is not None and self._valid_id != self._locked_id
                         else None))

    def _persist_lock(self, out: list[Effect]) -> None:
        """Persist a changed lock or valid value (or a block of theirs we just learned)
        before anything that depends on it can leave."""
        state = self.signing_state
        if not self._can_sign or state.height != self.height:
            return  # a node that cannot sign has nothing to forget; see _restore_lock
        updated = self._state(state.round, state.step, state.block_id)
        if updated != state:
            self.signing_state = updated
            out.append(PersistSigningState(replace(updated)))

    def _vote_and_step(self, kind: VoteType, block: Block | None, out: list[Effect]) -> None:
        """Sign and broadcast our prevote or precommit (if allowed), then enter the next step."""
        self.step = "prevote" if kind is VoteType.PREVOTE else "precommit"
        self._sign_vote(kind, self.round, None if block is None else block.id, block, out)

    def _sign_vote(self, kind: VoteType, round: int, block_id: bytes | None,
                   block: Block | None, out: list[Effect]) -> None:
        """Sign, broadcast and count our own vote, if we are a validator and may sign it."""
        if not self._can_sign or not self._may_sign(int(kind), block_id, out, round=round):
            return
        assert self.me is not None and self._sign is not None
        extension = b""
        if kind is VoteType.PRECOMMIT and block is not None:
            extension = self.app.precommit_extension(block)
        vote = Vote(kind, self.height, round, block_id, self.me,
                    extension=extension).signed(self.chain_id, self._sign)
        out.append(Broadcast(vote))
        self._own.append(vote)
        self._accept_vote(vote, None, out, verified=True)

    # --- the upon rules -------------------------------------------------------------------------

    def _run(self, out: list[Effect]) -> None:
        """Fire enabled rules until none is (or the height changed, which ran its own)."""
        height = self.height
        while self.height == height and self._fire_one(out):
            pass

    def _fire_one(self, out: list[Effect]) -> bool:
        """Fire the first enabled rule; False if none is."""
        # Line 49: a proposal and 2f+1 precommits for it, in any round. The block may
        # come from another round's proposal, or from before a restart: its id binds it.
        for round, block_id in sorted(self._commit_rounds.items()):
            block = self._blocks.get(block_id)
            if block is not None and self._validity.get(block_id, False):
                self._decide_round(block, round, out)
                return True
        # Line 55: f+1 validators are in a later round.
        later = [r for r in self._skip_rounds if r > self.round]
        if later:
            self._start_round(max(later), out)
            return True
        r = self.round
        if self.step == "propose":
            proposals = self._proposals.get(r)
            if proposals:
                proposal = next(iter(proposals.values()))  # the first one we received
                block, vr = proposal.block, proposal.valid_round
                if vr == -1:  # line 22
                    good = self._validity.get(block.id, False) and (
                        self.locked_round == -1 or self._is_locked_on(block))
                    self._vote_and_step(VoteType.PREVOTE, block if good else None, out)
                    return True
                if self._prevote_quorum_for(vr, block.id):  # line 28
                    good = self._validity.get(block.id, False) and (
                        self.locked_round <= vr or self._is_locked_on(block))
                    self._vote_and_step(VoteType.PREVOTE, block if good else None, out)
                    return True
        prevotes = self._prevotes.get(r)
        if _STEP_ORDER[self.step] >= 1 and r not in self._line36_rounds and prevotes:
            for candidate, power in prevotes.power.items():  # line 36
                if candidate is None or not self.validators.has_quorum(power):
                    continue
                block = self._blocks.get(candidate)  # (as for line 49)
                if block is None or not self._validity.get(candidate, False):
                    continue
                self._line36_rounds.add(r)
                self._valid_value, self._valid_id, self.valid_round = block, candidate, r
                if self.step == "prevote":
                    self._locked_block, self._locked_id, self.locked_round = block, candidate, r
                    self._vote_and_step(VoteType.PRECOMMIT, block, out)  # persists the lock
                else:
                    self._persist_lock(out)
                return True
        if self.step == "prevote" and prevotes:
            if self.validators.has_quorum(prevotes.power.get(None, 0)):  # line 44
                self._vote_and_step(VoteType.PRECOMMIT, None, out)
                return True
            if (r not in self._prevote_timeout_rounds  # line 34
                    and self.validators.has_quorum(prevotes.total)):
                self._prevote_timeout_rounds.add(r)
                self._schedule("prevote", out)
                return True
        precommits = self._precommits.get(r)
        if (precommits and r not in self._precommit_timeout_rounds  # line 47
                and self.validators.has_quorum(precommits.total)):
            self._precommit_timeout_rounds.add(r)
            self._schedule("precommit", out)
            return True
        return False

    def _is_locked_on(self, block: Block) -> bool:
        return self._locked_id == block.id

    def _prevote_quorum_for(self, round: int, block_id: bytes) -> bool:
        votes = self._prevotes.get(round)
        return votes is not None and self.validators.has_quorum(votes.power.get(block_id, 0))

    # --- deciding -----------------------------------------------------------------------------

    def _decide_round(self, block: Block, round: int, out: list[Effect]) -> None:
        precommits = tuple(self._precommits[round].for_block(block.id))
        self._decide(block, Commit(self.height, round, block.id, precommits), out)

    def _decide(self, block: Block, commit: Commit, out: list[Effect]) -> None:
        """Commit ``block``: apply its evidence (isolation), report, move to the next height."""
        isolated: list[str] = []
        refused: list[str] = []
        active = len(self.validators.active)
        offenders = sorted({e.offender for e in block.evidence})
        for offender in offenders:
            validator = self.validators.by_id.get(offender)
            if validator is None or validator.power == 0:
                continue
            if active - 1 >= MIN_ACTIVE:
                isolated.append(offender)
                active -= 1
            else:
                refused.append(offender)
        validators = self.validators.isolate(isolated) if isolated else self.validators
        self._committed_evidence.update(e.id for e in block.evidence)
        self.pending_evidence = [e for e in self.pending_evidence
                                 if e.id not in self._committed_evidence
                                 and e.offender not in offenders]
        if block.app_hash != self.app_hash and self.diverged is None:
            self.diverged = block
            out.append(Diverged(block, self.app_hash))
        out.append(Decided(block, commit, validators, tuple(isolated), tuple(refused)))
        self.height += 1
        self.validators = validators
        self._previous_id, self._previous_time = block.id, block.time_ms
        self._reset_height()
        self.executing = True
        if not self.await_execution:
            self._next_height(self.app_hash, (), out)

    def executed(self, app_hash: bytes, isolate: Iterable[str] = ()) -> list[Effect]:
        """The application executed the decided block: its state hash is now ``app_hash``,
        and it proved ``isolate`` misbehaving (their power is 0 from this height, as with
        committed evidence). Start the next height."""
        out: list[Effect] = []
        if self.executing:
            self._next_height(app_hash, isolate, out)
        return out

    def isolate_proven(self, offenders: Iterable[str]) -> None:
        """Isolate validators the application proved faulty (power 0), unless that would
        leave fewer than ``MIN_ACTIVE``: at the next height, or at start for those the
        executed blocks proved (the stored validator set may predate that block)."""
        active = len(self.validators.active)
        chosen = []
        for offender in sorted(set(offenders)):
            validator = self.validators.by_id.get(offender)
            if validator is not None and validator.power > 0 and active - 1 >= MIN_ACTIVE:
                chosen.append(offender)
                active -= 1
        if chosen:
            self.validators = self.validators.isolate(chosen)

    def _next_height(self, app_hash: bytes, isolate: Iterable[str], out: list[Effect]) -> None:
        self.app_hash = app_hash
        self.isolate_proven(isolate)
        self.executing = False
        self._start_round(0, out, after_decision=True)
        self._replay(out)
        held, self._held = self._held, []
        for message, sender in held:
            self._on_commit(message, sender, out)
        self._run(out)

    def _hold(self, message: Message, sender: str | None, out: list[Effect]) -> None:
        """While the last decided block executes: keep what comes for later heights."""
        if isinstance(message, CommitMessage):
            if message.commit.height >= self.height and len(self._held) < 8:
                self._held.append((message, sender))
            return
        if isinstance(message, Vote | Proposal):
            signer = message.validator if isinstance(message, Vote) else message.proposer
            if message.height >= self.height:
                self._buffer(message, signer, message.height, sender, out)

    def _replay(self, out: list[Effect]) -> None:
        """Hand buffered messages for the new height to the algorithm, in arrival order."""
        buffered = self._future.pop(self.height, [])
        self._future = {h: b for h, b in self._future.items() if h > self.height}
        self._future_count = {k: c for k, c in self._future_count.items() if k[0] > self.height}
        self._future_keys = {k for k in self._future_keys if k[0] > self.height}
        for item in buffered:
            if isinstance(item.message, Vote):
                self._accept_vote(item.message, item.sender, out, verified=True)
            else:
                self._accept_proposal(item.message, item.sender, out, verified=True)

    # --- incoming signed proposals and votes ------------------------------------------------

    def _on_signed(self, message: Proposal | Vote, signer: str, height: int,
                   sender: str | None, out: list[Effect]) -> None:
        """Route a proposal or vote by height: past (peer behind), current, future (buffer)."""
        if height == self.height:
            if isinstance(message, Vote):
                self._accept_vote(message, sender, out)
            else:
                self._accept_proposal(message, sender, out)
            return
        validator = self.validators.by_id.get(signer)
        if validator is not None and validator.power == 0:
            return  # isolated: ignored
        if height < self.height:
            target = sender if sender is not None else signer
            if (target, height) in self._behind_sent or height < 1:
                return
            if not self._verified(message, sender, out):
                return
            self._behind_sent.add((target, height))
            out.append(PeerBehind(target, height))
            return
        self._buffer(message, signer, height, sender, out)

    def _verified(self, message: Proposal | Vote, sender: str | None, out: list[Effect]) -> bool:
        """Check the signature under the current set; blame the transport sender if bad."""
        if message.verify(self.chain_id, self.validators):
            return True
        if sender is not None:
            kind = "vote" if isinstance(message, Vote) else "proposal"
            out.append(Misbehaviour(sender, f"{kind} with an invalid signature"))
        return False

    def _buffer(self, message: Proposal | Vote, signer: str, height: int, sender: str | None,
                out: list[Effect]) -> None:
        """Keep a bounded number of messages for the next heights; note who is ahead."""
        if isinstance(message, Vote):
            key: tuple[Any, ...] = (height, "vote", message.type, message.round,
                                    message.validator, message.block_id, message.signature)
        else:
            key = (height, "proposal", message.round, message.proposer, message.block.id,
                   message.signature)
        if key in self._future_keys:
            return
        if not self._verified(message, sender, out):
            return
        if height > self._heights_seen.get(signer, 0):
            self._heights_seen[signer] = height
        count = self._future_count.get((height, signer), 0)
        if height <= self.height + FUTURE_HEIGHTS and count < MAX_BUFFERED_PER_VALIDATOR:
            self._future_keys.add(key)
            self._future_count[(height, signer)] = count + 1
            self._future.setdefault(height, []).append(_Buffered(message, sender))
        ahead = self._ahead_of_us()
        if ahead is not None and self._need_blocks_asked < self.height:
            self._need_blocks_asked = self.height
            out.append(NeedBlocks(ahead, self.height))

    def _ahead_of_us(self) -> str | None:
        """A validator to fetch blocks from, if validators with more than a third of the
        power (so at least one honest one) have been seen at higher heights: then our
        height is decided. (A validator that waits to re-send its precommit until it sees
        the block says nothing, so the others would never report it behind.)"""
        ahead = [v for v, h in self._heights_seen.items() if h > self.height]
        if not ahead or not self.validators.has_one_third(self.validators.power_of(ahead)):
            return None
        return max(ahead, key=lambda v: (self._heights_seen[v], v))

    def _note_round(self, round: int, signer: str) -> None:
        """Track who is in which round, for the f+1 round skip (line 55)."""
        senders = self._round_senders.setdefault(round, set())
        if signer in senders:
            return
        senders.add(signer)
        if round > self.round and self.validators.has_one_third(
                self.validators.power_of(senders)):
            self._skip_rounds.add(round)

    def _accept_vote(self, vote: Vote, sender: str | None, out: list[Effect], *,
                     verified: bool = False) -> None:
        """Add a vote of the current height to its vote set (or turn it into evidence)."""
        if vote.round > self.round + ROUND_WINDOW:
            return
        validator = self.validators.by_id.get(vote.validator)
        if validator is not None and validator.power == 0:
            return
        sets = self._prevotes if vote.type is VoteType.PREVOTE else self._precommits
        votes = sets.get(vote.round)
        if votes is not None and votes.has(vote):
            return  # a duplicate (or the same vote with another extension)
        if validator is None or (not verified and not self._verified(vote, sender, out)):
            if validator is None and sender is not None:
                out.append(Misbehaviour(sender, "vote from a non-validator"))
            return
        if votes is None:
            votes = sets[vote.round] = _VoteSet()
        first = votes.first(vote.validator)
        if not votes.add(vote, validator.power):
            return
        if first is not None and len(votes.votes[vote.validator]) == 2:
            self._add_evidence(DuplicateVoteEvidence.of(first, vote), out)
        if (vote.type is VoteType.PRECOMMIT and vote.block_id is not None
                and self.validators.has_quorum(votes.power[vote.block_id])):
            self._commit_rounds[vote.round] = vote.block_id
        self._note_round(vote.round, vote.validator)
        if self.relay and vote.validator != self.me:
            out.append(Broadcast(vote))

    def _accept_proposal(self, proposal: Proposal, sender: str | None, out: list[Effect], *,
                         verified: bool = False) -> None:
        """Keep a proposal of the current height if its proposer's turn, and judge its block."""
        if proposal.round > self.round + ROUND_WINDOW:
            return
        validator = self.validators.by_id.get(proposal.proposer)
        if validator is not None and validator.power == 0:
            return
        known = self._proposals.get(proposal.round, {})
        if proposal.block.id in known:
            return
        if validator is None or (not verified and not self._verified(proposal, sender, out)):
            if validator is None and sender is not None:
                out.append(Misbehaviour(sender, "proposal from a non-validator"))
            return
        if proposal.proposer != self.validators.proposer(self.height, proposal.round):
            out.append(Misbehaviour(proposal.proposer, "proposal out of turn"))
            return
        if not -1 <= proposal.valid_round < proposal.round:
            out.append(Misbehaviour(proposal.proposer, "proposal valid_round not below round"))
            return
        if known:
            out.append(Misbehaviour(proposal.proposer,
                                    f"conflicting proposals at round {proposal.round}"))
            if len(known) >= MAX_PROPOSALS_PER_ROUND:
                return
        self._proposals.setdefault(proposal.round, {})[proposal.block.id] = proposal
        self._note_round(proposal.round, proposal.proposer)
        block = self._blocks.setdefault(proposal.block.id, proposal.block)
        if block.id not in self._validity:
            reason = self._invalid_reason(block)
            self._validity[block.id] = reason is None
            if reason is not None:
                out.append(Misbehaviour(proposal.proposer, f"invalid block: {reason}"))
        if self._validity[block.id] and self._learn(block):
            self._persist_lock(out)  # the locked or valid block we lacked since a restart
        resend = self._resend_precommit
        if resend is not None and resend[1] == block.id:
            self._resend_precommit = None
            self._sign_vote(VoteType.PRECOMMIT, resend[0], block.id, block, out)

    def _invalid_reason(self, block: Block) -> str | None:
        """Why ``block`` cannot be decided at this height (None if it can)."""
        if block.height != self.height:
            return f"height {block.height}, expected {self.height}"
        if block.previous != self._previous_id:
            return "previous is not the last decided block"
        proposer = self.validators.by_id.get(block.proposer)
        if proposer is None or proposer.power == 0:
            return "proposer is not a validator"
        if block.time_ms <= self._previous_time:
            return "time is not after the previous block's"
        if block.app_hash != self.app_hash:
            return "its state hash is not ours"
        ids = [e.id for e in block.evidence]
        if len(set(ids)) != len(ids):
            return "evidence appears twice"
        for evidence in block.evidence:
            if evidence.id in self._committed_evidence:
                return "evidence is already committed"
            try:
                evidence.verify(self.chain_id, self.validators)
            except BadMessage as exc:
                return str(exc)
        if not self.app.valid(block):
            return "rejected by the application"
        return None

    # --- evidence and commits -------------------------------------------------------------------

    def _on_evidence(self, evidence: DuplicateVoteEvidence, sender: str | None,
                     out: list[Effect]) -> None:
        if evidence.id in self._seen_evidence or evidence.id in self._committed_evidence:
            return
        try:
            evidence.verify(self.chain_id, self.validators)
        except BadMessage as exc:
            if sender is not None:
                out.append(Misbehaviour(sender, f"invalid evidence: {exc}"))
            return
        self._add_evidence(evidence, out)

    def _add_evidence(self, evidence: DuplicateVoteEvidence, out: list[Effect]) -> None:
        """Record verified evidence once per offender until committed, and spread it."""
        self._seen_evidence.add(evidence.id)
        offender = self.validators.by_id.get(evidence.offender)
        if (offender is None or offender.power == 0
                or evidence.id in self._committed_evidence
                or any(e.offender == evidence.offender for e in self.pending_evidence)):
            return
        self.pending_evidence.append(evidence)
        out.append(EvidenceFound(evidence))
        out.append(Broadcast(evidence))

    def _on_commit(self, message: CommitMessage, sender: str | None, out: list[Effect]) -> None:
        """Catch up: decide a verified commit for our height; ask for blocks if it is above."""
        block, commit = message.block, message.commit
        if commit.height < self.height:
            return
        if commit.height > self.height:
            signers = self._commit_signers(commit)
            if signers and self.validators.has_one_third(self.validators.power_of(signers)):
                source = sender if sender is not None else signers[0]
                if self._need_blocks_asked < self.height:
                    self._need_blocks_asked = self.height
                    out.append(NeedBlocks(source, self.height))
            return
        try:
            if block.height != commit.height or block.id != commit.block_id:
                raise BadMessage("the commit is not for this block")
            if block.previous != self._previous_id:
                raise BadMessage("the block does not extend our last decided block")
            commit.verify(self.chain_id, self.validators)
        except BadMessage as exc:
            if sender is not None:
                out.append(Misbehaviour(sender, f"invalid commit: {exc}"))
            return
        self._decide(block, commit, out)

    def _commit_signers(self, commit: Commit) -> list[str]:
        """Validators whose precommits in ``commit`` verify (for a height we cannot check fully,
        as the validator set there may differ); empty if any precommit is bad."""
        signers: list[str] = []
        for vote in commit.precommits:
            if (vote.type is not VoteType.PRECOMMIT or vote.height != commit.height
                    or vote.round != commit.round or vote.block_id != commit.block_id
                    or vote.validator in signers
                    or not vote.verify(self.chain_id, self.validators)):
                return []
            signers.append(vote.validator)
        return signers
