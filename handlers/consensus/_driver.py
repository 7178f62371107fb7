"""A validator: the Tendermint core (:mod:`.bft`) run over a transport, with its chain on disk.

One task feeds the core, one input at a time (a message, a timeout, a tick),
and performs the effects it returns in order: the signing state is durable
before any signed message leaves, a decided block is durable before anyone
is told it was decided. Decisions (application records, opaque here) wait in
a mempool until a block carries them; the node that submitted one learns of
its commit through :meth:`ConsensusChain.submit`.

The network is a :class:`PeerLinks` supplied by the composition root, so that nothing
here knows about QUIC. A single node is the n = 1 case of the same code: it
proposes, votes and decides by itself, and a block costs one fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from protocol import ConsensusRejected, Timeout, decode_item, encode_deterministic
from protocol.loglimit import LogLimiter
from store import ChainStore, StoredBlock, StoredEvidence

from ._compact import (
    COMPACT_KIND,
    WANT_KIND,
    compact_proposal,
    parse_want,
    rebuild_proposal,
    want_proposal,
)
from ._sealed import GROUP_KIND, SealError, SealOpener, parse_group, whole_batches
from .bft import (
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
    decode_message,
    encode_message,
)
from .bft._core import (
    Broadcast,
    Decided,
    Diverged,
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

log = logging.getLogger("trustchain.consensus")
peer_log = LogLimiter(log)
"""Lines other validators can trigger (misbehaviour), rate-limited."""

MAX_CLOCK_DRIFT_MS = 5_000
"""A proposed block may not be stamped further than this ahead of our clock."""
MAX_MEMPOOL = 50_000
MAX_OUTBOX = 4_096
RELAY_DELAY = 0.05
"""Seconds a relayed vote may wait for other traffic to the same peer. A relay only
catches a validator that sends different votes to different peers (§18.3): every
validator sends its own votes to every peer itself, so a relay rarely carries news and
need not cost a request of its own."""
SYNC_BATCH = 64
ENVELOPE_ROOM = 4096
"""Bytes kept free in a frame for the request envelope and CBOR headers (at most a
quarter of a small frame)."""


_DECIDED_HEAD = b"\xa3\x64kind\x67decided"
"""A map of three pairs and its first, ``kind``: deterministic CBOR orders the keys
``kind``, ``block``, ``commit`` (by their encodings' bytes)."""


def decided_message(block: bytes, commit: bytes) -> bytes:
    """The ``bft-decided`` message of a stored block and its commit, both already in
    deterministic CBOR: spliced in place, never decoded and encoded again."""
    return _DECIDED_HEAD + b"\x65block" + block + b"\x66commit" + commit


MAX_BEHIND_NOTED = 256
"""(peer, height) pairs remembered as reported behind once (the oldest forgotten first)."""

MAX_KEPT_PROPOSALS = 16
"""Our latest proposals, kept whole for a peer that could not rebuild one (``want-proposal``)."""
WANT_DELAY = 0.2
"""Seconds a compact proposal waits for decisions it names that have not arrived
before the whole proposal is asked for: they are usually still on their way from
their entry, whose gossip to this validator and to the proposer travel apart."""


def decision_digest(decision: bytes) -> bytes:
    return hashlib.sha256(decision).digest()


@dataclass(frozen=True)
class Executed:
    """What executing a committed block did: each decision's outcome (the
    application's), the state hash after it, and the validators it proved faulty."""

    outcomes: tuple[Any, ...]
    app_hash: bytes
    isolate: tuple[str, ...] = ()


@dataclass(frozen=True)
class Committed:
    """Where a decision was committed, and what executing it did."""

    block: Block
    index: int
    commit: Commit
    outcome: Any = None
    """The application's outcome of the decision (None when executed before a restart)."""

    @property
    def block_hash(self) -> bytes:
        return self.block.id

    def signatures(self) -> list[dict[str, Any]]:
        """The commit's precommits as a client checks them (spec §18.14): each signs
        ``[ctx, chain_id, "precommit", height, round, block_hash, validator, extension]``."""
        return [{"validator": v.validator, "signature": v.signature, "extension": v.extension}
                for v in self.commit.precommits]


class PeerLinks(Protocol):
    """How a validator reaches the others (STOQ in production, anything in tests)."""

    async def send(self, validator: str, messages: list[bytes]) -> None:
        """Deliver ``messages`` to ``validator``; raise if it could not be reached."""

    async def fetch_blocks(self, validator: str, start: int,
                           limit: int) -> list[tuple[bytes, bytes]]:
        """``(block, commit)`` encodings from ``start``, as ``consensus.blocks`` answers."""

    def drop(self, validator: str) -> None:
        """Close every connection to or from ``validator`` (isolated)."""


class Rules(Protocol):
    """What the application decides about its decisions, and its state."""

    @property
    def state_hash(self) -> bytes:
        """The hash of the application's state after the last block it executed."""

    @property
    def executed_height(self) -> int:
        """The height of the last block the application executed (0: none)."""

    def isolated(self) -> frozenset[str]:
        """The validators the executed blocks proved faulty (kept in the state)."""

    async def check(self, decision: bytes, validators: ValidatorSet,
                    sender: str | None = None) -> str | None:
        """None if ``decision`` may be committed, else why not (``validators``: the
        current set; ``sender``: the validator whose gossip brought it, None if it came
        in a block or from this node). Called once per decision."""

    async def execute(self, block: Block, commit: Commit) -> Executed:
        """Apply a committed block; durable, before anyone is told of it."""

    def extension(self, block: Block) -> bytes:
        """This validator's precommit extension for ``block`` (b"" for none)."""


class OpenRules:
    """Every well-formed decision is valid; the state is the chain itself (tests)."""

    state_hash = bytes(32)

    def __init__(self) -> None:
        self.executed_height = 0

    def isolated(self) -> frozenset[str]:
        return frozenset()

    async def check(self, decision: bytes, validators: ValidatorSet,
                    sender: str | None = None) -> str | None:
        return None

    async def execute(self, block: Block, commit: Commit) -> Executed:
        self.executed_height = block.height
        return Executed(outcomes=(None,) * len(block.decisions), app_hash=self.state_hash)

    def extension(self, block: Block) -> bytes:
        return b""


@dataclass
class _Peer:
    id: str
    name: str
    outbox: list[bytes] = field(default_factory=list)
    relays: list[bytes] = field(default_factory=list)
    """Relayed votes waiting for other traffic to this peer (or :data:`RELAY_DELAY`)."""
    relay_timer: asyncio.TimerHandle | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    connected: bool = False
    last_error: str | None = None
    sent: int = 0


@dataclass
class _Incomplete:
    """A compact proposal whose decisions are not all in the mempool yet."""

    item: dict[str, Any]
    sender: str | None
    missing: set[bytes]
    timer: asyncio.TimerHandle


class ConsensusChain:
    """One validator (or observer) of a cluster.

    :param me: this node's validator id; None to follow without voting.
    :param sign: signs with this node's validator key (Ed25519).
    :param names: validator id -> label, for status and logs.
    :param seals: opens the decision groups peers send (share the rules' opener, so
        that a group's signature is verified once for the group and its decisions).
    """

    def __init__(self, *, chain_id: str, validators: ValidatorSet, store: ChainStore,
                 transport: PeerLinks, rules: Rules, me: str | None,
                 sign: Callable[[bytes], bytes] | None, timeouts: Timeouts,
                 block_interval: float = 1.0, gossip_interval: float = 0.5,
                 max_block_decisions: int = 1000, max_frame_size: int = 1 << 20,
                 names: dict[str, str] | None = None,
                 audit: Callable[[str, dict[str, Any]], Awaitable[Any]] | None = None,
                 seals: SealOpener | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.chain_id = chain_id
        self.store = store
        self.transport = transport
        self.rules = rules
        self.me = me
        self.sign = sign
        self.block_interval = block_interval
        self.gossip_interval = gossip_interval
        self.max_block_decisions = max_block_decisions
        self.max_message_bytes = max_frame_size - min(ENVELOPE_ROOM, max_frame_size // 4)
        """Largest gossip batch: a ``consensus.gossip`` request must fit in a frame."""
        self.max_block_bytes = self.max_message_bytes // 2
        """Largest block: a proposal (a block plus its envelope) fits in a frame, and so
        does a ``bft-decided`` (block plus commit) for a validator that is behind."""
        self.names = dict(names or {})
        self.clock = clock
        self._audit = audit
        self.genesis_validators = validators
        self.mempool: OrderedDict[bytes, bytes] = OrderedDict()
        self._proposed: OrderedDict[tuple[int, int], Proposal] = OrderedDict()
        self._behind: dict[tuple[str, int], int] = {}
        """(peer, height) -> how often reported behind (:meth:`_peer_behind`)."""
        self.proposals = {"rebuilt": 0, "waited": 0, "wanted": 0, "served": 0}
        """Compact proposals rebuilt from the mempool (of which ``waited`` for decisions
        still on their way), asked for whole, sent whole."""
        self._incomplete: dict[tuple[int, int], _Incomplete] = {}
        """Compact proposals waiting for decisions (:meth:`_await_decisions`)."""
        self.seals = seals if seals is not None else SealOpener()
        self.decision_groups = {"sent": 0, "received": 0, "refused": 0}
        """Decision groups (whole seal batches) sent to a peer, received and opened,
        received and refused."""
        self._unsent: list[bytes] = []
        """This loop turn's new decisions, gossiped together when it ends."""
        self._unsent_handle: asyncio.Handle | None = None
        self._verdicts: dict[bytes, str | None] = {}
        self._checking: dict[bytes, asyncio.Future[str | None] | None] = {}
        """Digests being checked -> the future a second asker shares (None: none asked)."""
        self._waiters: dict[bytes, list[asyncio.Future[Committed]]] = {}
        self._inputs: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[Any]] = []
        self._timers: set[asyncio.TimerHandle] = set()
        self._pending_state: SigningState | None = None
        self._syncing = False
        self.last_block: Block | None = None
        self.last_commit: Commit | None = None
        self.misbehaviour: list[dict[str, Any]] = []
        self.evidence_found_at: dict[bytes, float] = {}
        self.decided_at: dict[int, float] = {}
        self.started = False
        self.failure: BaseException | None = None
        self.diverged: str | None = None
        """Why this validator's state is not the cluster's (it stopped voting)."""

        # restore: last block, validator set and signing state
        latest = store.latest()
        previous: Block | None = None
        if latest is not None:
            previous = Block.from_wire(decode_item(latest.block))
            self.last_block = previous
            self.last_commit = Commit.from_wire(decode_item(latest.commit))
        current = validators
        committed_evidence: list[bytes] = []
        for stored in store.evidence():
            if stored.committed_height is not None:
                committed_evidence.append(stored.id)
        raw_set = store.meta("validators")
        if raw_set is not None:
            current = _validator_set_from_wire(decode_item(raw_set), validators)
        raw_state = store.signing_state()
        state = SigningState.from_wire(decode_item(raw_state)) if raw_state else None
        self.core = Tendermint(
            chain_id=chain_id, validators=current, app=self, me=me, sign=sign,
            height=(previous.height + 1) if previous else 1, previous=previous,
            signing_state=state, timeouts=timeouts, committed_evidence=committed_evidence,
            app_hash=rules.state_hash, await_execution=True)
        self.peers = {v.id: _Peer(v.id, self.names.get(v.id, v.id[:8]))
                      for v in current.validators if v.id != me}
        self._recorded_set = store.validator_set_at(self.core.height)
        if store.first_recorded_validator_set() is None \
                and _validator_set_to_wire(current) == _validator_set_to_wire(validators):
            # nothing recorded yet (a new chain, or one from before the record): powers
            # only ever drop to 0, so a set equal to the configured one decided every height
            self._recorded_set = self._encoded_validators()
            store.record_validator_set_now(1, self._recorded_set)
        elif self._recorded_set != self._encoded_validators():
            self._recorded_set = self._encoded_validators()
            store.record_validator_set_now(self.core.height, self._recorded_set)

    # --- the application side of the core (synchronous, called by Tendermint) -------------

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def proposal(self, height: int, round: int) -> tuple[int, tuple[bytes, ...]] | None:
        executed = self.last_block.height if self.last_block else 0
        if round == 0 and height != executed + 1:
            # the core decided the previous height in this very call: its block is not
            # stored yet, and the mempool still holds its decisions; ask again after
            return None
        decisions: list[bytes] = []
        size = 0
        for digest, decision in self.mempool.items():
            if (len(decisions) >= self.max_block_decisions
                    or size + len(decision) + 16 > self.max_block_bytes):
                break
            if self.store.decision(digest) is None:
                decisions.append(decision)
                size += len(decision) + 16
        last_ms = self.last_block.time_ms if self.last_block else 0
        now = self._now_ms()
        if not decisions and round == 0 and (
                not self.peers or now - last_ms < self.block_interval * 1000):
            # Empty blocks keep a cluster's heights, beacons and evidence moving; a
            # validator alone needs none of that, and writes a block only to decide.
            return None
        return max(now, last_ms + 1), tuple(decisions)

    def valid(self, block: Block) -> bool:
        reason = self._invalid(block)
        if reason is not None:
            log.info("block %d refused: %s", block.height, reason)
        return reason is None

    def _invalid(self, block: Block) -> str | None:
        if block.time_ms > self._now_ms() + MAX_CLOCK_DRIFT_MS:
            return "stamped in the future"
        if len(block.encoded) > self.max_block_bytes + min(ENVELOPE_ROOM,
                                                           self.max_block_bytes // 2):
            return f"{len(block.encoded)} bytes, above the block size limit"
        seen: set[bytes] = set()
        for digest in block.digests:
            if digest in seen:
                return "a decision appears twice"
            verdict = self._verdicts.get(digest, "not checked")
            if verdict is not None:
                return f"decision {digest.hex()[:16]}: {verdict}"
            if self.store.decision(digest) is not None:
                return f"decision {digest.hex()[:16]} was committed before"
            seen.add(digest)
        return None

    def precommit_extension(self, block: Block) -> bytes:
        return self.rules.extension(block)

    # --- submitting decisions --------------------------------------------------------------

    async def _check(self, decision: bytes, sender: str | None = None,
                     digest: bytes | None = None) -> str | None:
        """The application's verdict on ``decision``, asked once per digest
        (``sender``: the validator whose gossip brought it; ``digest``: the decision's,
        if the caller has it).

        Awaited in place, without a task: most checks never wait (everything they
        need is in memory), and those cost no future either. A digest being checked
        is in ``_checking``; a second asker meanwhile makes the future that both
        share, and the first resolves it."""
        if digest is None:
            digest = decision_digest(decision)
        if digest in self._verdicts:
            return self._verdicts[digest]
        if digest in self._checking:
            shared = self._checking[digest]
            if shared is None:
                shared = asyncio.get_running_loop().create_future()
                self._checking[digest] = shared
            return await asyncio.shield(shared)
        self._checking[digest] = None
        try:
            verdict = await self.rules.check(decision, self.core.validators, sender)
        except Exception as exc:  # a checker failure refuses the decision, never the node
            verdict = f"the check failed: {exc}"
        except BaseException:  # cancelled (shutting down): so is whoever shares it
            shared = self._checking.pop(digest, None)
            if shared is not None:
                shared.cancel()
            raise
        shared = self._checking.pop(digest, None)
        if len(self._verdicts) > 4 * MAX_MEMPOOL:
            self._verdicts.clear()
        self._verdicts[digest] = verdict
        if verdict is not None:
            log.warning("decision refused", extra={"decision": digest.hex()[:16],
                                                   "reason": verdict})
        if shared is not None:
            shared.set_result(verdict)
        return verdict

    def _accept(self, decision: bytes, digest: bytes) -> bool:
        if len(decision) + 16 > self.max_block_bytes:
            raise ConsensusRejected(f"the decision is {len(decision)} bytes; a block holds at "
                                    f"most {self.max_block_bytes} (half the frame limit)")
        if digest in self.mempool or self.store.decision(digest) is not None:
            return False
        if len(self.mempool) >= MAX_MEMPOOL:
            raise ConsensusRejected("the consensus mempool is full; try again shortly")
        self.mempool[digest] = decision
        return True

    async def submit(self, decision: bytes, *, checked: bool = True,
                     timeout: float = 30.0) -> Committed:
        """Propose ``decision`` to the cluster and wait until a block commits it.

        :param checked: the caller has already checked it (its own admission);
            else :meth:`Rules.check` runs first.
        :raises ConsensusRejected: refused by the check, or the mempool is full.
        :raises Timeout: not committed within ``timeout`` seconds (it may still be later).
        """
        if self.failure is not None:
            raise ConsensusRejected(f"consensus has stopped: {self.failure}")
        digest = decision_digest(decision)
        if checked:
            self._verdicts[digest] = None
        else:
            verdict = await self._check(decision, digest=digest)
            if verdict is not None:
                raise ConsensusRejected(f"the decision was refused: {verdict}")
        future: asyncio.Future[Committed] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(digest, []).append(future)
        try:
            where = self.store.decision(digest)
            if where is not None:  # already committed (a resubmission)
                return await self._committed_at(*where)
            if self._accept(decision, digest):
                self._gossip_later(decision)
                self._inputs.put_nowait(("content",))
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise Timeout(f"the decision was not committed within {timeout:g} s") from None
        finally:
            waiters = self._waiters.get(digest, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(digest, None)

    async def _committed_at(self, height: int, index: int) -> Committed:
        stored = self.store.block(height)
        assert stored is not None
        return Committed(Block.from_wire(decode_item(stored.block)), index,
                         Commit.from_wire(decode_item(stored.commit)))

    def _gossip_later(self, decision: bytes) -> None:
        """Gossip ``decision`` when this loop turn ends, with the others of the turn: the
        decisions of one seal batch are submitted in the same turn (the sealer wakes
        them together), so a whole batch goes as one group."""
        if not self.peers:
            return  # a single validator: nobody to tell
        self._unsent.append(decision)
        if self._unsent_handle is None:
            self._unsent_handle = asyncio.get_running_loop().call_soon(self._send_decisions)

    def _send_decisions(self) -> None:
        """Send the decisions waiting in :attr:`_unsent`: each whole batch this validator
        sealed as a ``decision-group`` (its bodies without their paths), the others in
        ``decisions`` messages, each message within a frame."""
        if self._unsent_handle is not None:
            self._unsent_handle.cancel()
            self._unsent_handle = None
        decisions, self._unsent = self._unsent, []
        if not decisions:
            return
        groups, rest = whole_batches(decisions, self.me or "", self.max_message_bytes - 8)
        payloads = [group.message() for group in groups]
        self.decision_groups["sent"] += len(groups)
        chunk: list[bytes] = []
        size = 64
        for decision in rest:
            if chunk and size + len(decision) + 8 > self.max_message_bytes:
                payloads.append(encode_deterministic({"kind": "decisions", "items": chunk}))
                chunk, size = [], 64
            chunk.append(decision)
            size += len(decision) + 8
        if chunk:
            payloads.append(encode_deterministic({"kind": "decisions", "items": chunk}))
        for payload in payloads:
            for peer in self.peers.values():
                self._enqueue(peer, payload)

    # --- receiving ------------------------------------------------------------------------

    async def receive(self, payloads: list[bytes], sender: str | None = None) -> int:
        """Take what a peer sent (``consensus.gossip``); returns how many were usable.

        Decisions are checked before they enter the mempool, and a proposal's
        unknown decisions before the core sees it, so that the core's validity
        test is a lookup.
        """
        if sender is not None and sender in self.isolated:
            raise ConsensusRejected(f"validator {sender} is isolated; its messages are ignored")
        usable = 0
        for payload in payloads:
            try:
                item = decode_item(payload)
            except Exception:
                self._misbehaved(sender, "sent a message that is not CBOR")
                continue
            kind = item.get("kind") if isinstance(item, dict) else None
            if kind == "decisions":
                usable += await self._receive_decisions(item.get("items"), sender)
                continue
            if kind == GROUP_KIND:
                usable += await self._receive_group(item, sender)
                continue
            try:
                if kind == WANT_KIND:
                    usable += self._serve_proposal(parse_want(item), sender)
                    continue
                if kind == COMPACT_KIND:
                    rebuilt = rebuild_proposal(item, self.mempool.get)
                    if isinstance(rebuilt, Proposal):
                        await self._take_rebuilt(rebuilt, sender)
                        usable += 1
                    else:
                        self._await_decisions(item, rebuilt, sender)
                    continue
                message = decode_message(payload)
                if isinstance(message, Proposal | CommitMessage):
                    await self._precheck(message.block)
            except BadMessage as exc:
                self._misbehaved(sender, f"sent a malformed consensus message: {exc}")
                continue
            self._inputs.put_nowait(("message", message, sender))
            usable += 1
        return usable

    def _await_decisions(self, item: dict[str, Any], proposal: tuple[int, int],
                         sender: str | None) -> None:
        """Keep a compact proposal that names decisions this validator lacks until they
        arrive (:meth:`_complete`), or ask for it whole after :data:`WANT_DELAY`."""
        if proposal in self._incomplete:
            return
        if len(self._incomplete) >= MAX_KEPT_PROPOSALS:
            self._want(proposal, sender)
            return
        missing = {d for d in item["digests"] if d not in self.mempool}
        handle = asyncio.get_running_loop().call_later(WANT_DELAY, self._give_up, proposal)
        self._incomplete[proposal] = _Incomplete(item, sender, missing, handle)

    def _give_up(self, proposal: tuple[int, int]) -> None:
        waiting = self._incomplete.pop(proposal, None)
        if waiting is not None and proposal[0] >= self.core.height:
            self._want(proposal, waiting.sender)

    async def _complete(self, accepted: list[bytes]) -> None:
        """Take the compact proposals whose last missing decisions just arrived."""
        ready = []
        for proposal, waiting in self._incomplete.items():
            waiting.missing.difference_update(accepted)
            if not waiting.missing:
                ready.append(proposal)
        for proposal in ready:
            waiting = self._incomplete.pop(proposal)
            waiting.timer.cancel()
            rebuilt = rebuild_proposal(waiting.item, self.mempool.get)
            if not isinstance(rebuilt, Proposal):  # (one left the mempool meanwhile)
                self._want(rebuilt, waiting.sender)
                continue
            self.proposals["waited"] += 1
            await self._take_rebuilt(rebuilt, waiting.sender)

    async def _take_rebuilt(self, proposal: Proposal, sender: str | None) -> None:
        """Hand the core a proposal rebuilt from the mempool, its decisions checked."""
        self.proposals["rebuilt"] += 1
        await self._precheck(proposal.block)
        self._inputs.put_nowait(("message", proposal, sender))

    def _want(self, proposal: tuple[int, int], sender: str | None) -> None:
        """Ask ``sender`` for the whole proposal it sent compact: a decision is missing."""
        peer = self.peers.get(sender) if sender is not None else None
        if peer is not None:
            self.proposals["wanted"] += 1
            self._enqueue(peer, want_proposal(*proposal))

    def _serve_proposal(self, proposal: tuple[int, int], sender: str | None) -> int:
        """Send ``sender`` the whole proposal it asked for, if it is one of ours still kept."""
        whole = self._proposed.get(proposal)
        peer = self.peers.get(sender) if sender is not None else None
        if whole is None or peer is None:
            return 0
        self.proposals["served"] += 1
        self._enqueue(peer, encode_message(whole))  # encoded only when a peer asks
        return 1

    async def _receive_group(self, item: dict[Any, Any], sender: str | None) -> int:
        """Take a ``decision-group``: its sealed decisions rebuilt, byte for byte, then
        taken as if they had come in a ``decisions`` message. A group that is malformed
        or whose signature does not verify counts against the sender, and nothing of
        it is taken."""
        try:
            decisions = self.seals.open_group(parse_group(item), self.core.validators)
        except SealError as exc:
            self.decision_groups["refused"] += 1
            self._misbehaved(sender, f"sent a decision group that does not open: {exc}")
            return 0
        self.decision_groups["received"] += 1
        return await self._receive_decisions(decisions, sender)

    async def _receive_decisions(self, items: Any, sender: str | None) -> int:
        if not isinstance(items, list) or not all(isinstance(d, bytes) for d in items):
            self._misbehaved(sender, "sent a malformed decision batch")
            return 0
        accepted: list[bytes] = []
        for decision in items:  # one after the other: most checks never wait (_check)
            digest = decision_digest(decision)
            if digest in self.mempool:
                continue
            if await self._check(decision, sender, digest) is None:
                with contextlib.suppress(ConsensusRejected):
                    if self._accept(decision, digest):
                        accepted.append(digest)
        if accepted:
            self._inputs.put_nowait(("content",))
            if self._incomplete:
                await self._complete(accepted)
        return len(accepted)

    async def _precheck(self, block: Block) -> None:
        """Check the block's decisions not checked yet (one after the other: most
        checks never wait, see :meth:`_check`)."""
        for decision, digest in zip(block.decisions, block.digests, strict=True):
            if digest not in self._verdicts:
                await self._check(decision, digest=digest)

    def misbehaved(self, validator: str | None, reason: str) -> None:
        """Record misbehaviour (``consensus.status`` counts it; the log says what)."""
        self._misbehaved(validator, reason)

    def _misbehaved(self, validator: str | None, reason: str) -> None:
        entry = {"validator": validator, "reason": reason, "at": self.clock()}
        self.misbehaviour.append(entry)
        del self.misbehaviour[:-100]
        peer_log.warning("consensus misbehaviour",
                         extra={"validator": validator, "reason": reason})

    # --- the loop -------------------------------------------------------------------------

    @property
    def isolated(self) -> set[str]:
        return {v.id for v in self.core.validators.validators if v.power == 0}

    async def start(self) -> None:
        """Execute the stored blocks the application has not (a crash between the two
        commits), then start the consensus task, the ticker and one sender per peer."""
        if self.started:
            return
        await self._catch_up_state()
        self.started = True
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._run(), name="consensus"))
        self._tasks.append(loop.create_task(self._tick(), name="consensus-tick"))
        for peer in self.peers.values():
            self._tasks.append(loop.create_task(self._sender(peer),
                                                name=f"consensus-send-{peer.name}"))
        self._inputs.put_nowait(("start",))

    async def _catch_up_state(self) -> None:
        latest = self.last_block.height if self.last_block else 0
        for height in range(self.rules.executed_height + 1, latest + 1):
            stored = self.store.block(height)
            assert stored is not None
            block = Block.from_wire(decode_item(stored.block))
            if block.app_hash != self.rules.state_hash:
                self._diverge(block, self.rules.state_hash)
                return
            await self.rules.execute(block, Commit.from_wire(decode_item(stored.commit)))
            log.info("stored block executed", extra={"height": height})
        self.core.app_hash = self.rules.state_hash
        self.core.isolate_proven(self.rules.isolated())
        for offender in sorted(self.isolated):
            self.transport.drop(offender)

    def _diverge(self, block: Block, ours: bytes) -> None:
        self.diverged = (f"the block at height {block.height} carries state hash "
                         f"{block.app_hash.hex()[:16]}, ours is {ours.hex()[:16]}: this "
                         "validator's state is not the cluster's; it stopped voting")
        self.core.diverged = block
        log.critical("consensus: state diverged", extra={"height": block.height,
                                                        "reason": self.diverged})

    async def stop(self) -> None:
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        for waiting in self._incomplete.values():
            waiting.timer.cancel()
        self._incomplete.clear()
        for peer in self.peers.values():
            if peer.relay_timer is not None:
                peer.relay_timer.cancel()
                peer.relay_timer = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for waiters in self._waiters.values():
            for future in waiters:
                if not future.done():
                    future.set_exception(ConsensusRejected("the node is shutting down"))
        self.started = False

    async def _run(self) -> None:
        try:
            while True:
                item = await self._inputs.get()
                effects = self._feed(item)
                if effects:
                    await self._perform(effects)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.failure = exc
            log.exception("consensus stopped")
            for waiters in self._waiters.values():
                for future in waiters:
                    if not future.done():
                        future.set_exception(ConsensusRejected(f"consensus stopped: {exc}"))
            raise

    def _feed(self, item: tuple[Any, ...]) -> list[Effect]:
        kind = item[0]
        core = self.core
        if kind == "message":
            return core.receive(item[1], item[2])
        if kind == "timeout":
            return core.on_timeout(item[1], item[2], item[3])
        if kind == "content":
            return core.content_available()
        if kind == "gossip":
            return core.gossip()
        if kind == "start":
            return core.start()
        raise AssertionError(kind)

    async def _tick(self) -> None:
        period = min(self.gossip_interval, self.block_interval) / 2
        last_gossip = time.monotonic()
        while True:
            await asyncio.sleep(period)
            last_ms = self.last_block.time_ms if self.last_block else 0
            if self._now_ms() - last_ms >= self.block_interval * 1000:
                self._inputs.put_nowait(("content",))
            if self.peers and time.monotonic() - last_gossip >= self.gossip_interval:
                last_gossip = time.monotonic()
                self._inputs.put_nowait(("gossip",))

    async def _flush_state(self) -> None:
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            await self.store.save_signing_state(encode_deterministic(state.to_wire()))

    async def _perform(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, PersistSigningState):
                self._pending_state = effect.state
            elif isinstance(effect, Broadcast):
                if self.peers:
                    await self._flush_state()
                    message = effect.message
                    payload = self._outgoing(message)
                    isolated = self.isolated
                    if isinstance(message, Vote) and message.validator != self.me:
                        for peer in self.peers.values():
                            if peer.id not in isolated and peer.id != message.validator:
                                self._relay(peer, payload)
                        continue
                    for peer in self.peers.values():
                        if peer.id not in isolated:
                            self._enqueue(peer, payload)
            elif isinstance(effect, SendTo):
                target = self.peers.get(effect.validator)
                if target is not None:
                    await self._flush_state()
                    self._enqueue(target, self._outgoing(effect.message))
            elif isinstance(effect, ScheduleTimeout):
                self._schedule(effect.step, effect.height, effect.round, effect.delay)
            elif isinstance(effect, Diverged):
                self._diverge(effect.block, effect.ours)
            elif isinstance(effect, Decided):
                await self._decided(effect)
            elif isinstance(effect, EvidenceFound):
                await self._evidence(effect.evidence)
            elif isinstance(effect, Misbehaviour):
                self._misbehaved(effect.validator, effect.reason)
            elif isinstance(effect, PeerBehind):
                self._peer_behind(effect.validator, effect.height)
            elif isinstance(effect, NeedBlocks):
                self._start_sync(effect.validator, effect.from_height)
        if self.peers:
            await self._flush_state()

    def _outgoing(self, message: Message) -> bytes:
        """``message`` as peers get it: a proposal names its decisions by digest (each
        peer had them from the decision gossip); the whole one is kept for a peer that
        asks (``want-proposal``)."""
        if not isinstance(message, Proposal) or not message.block.decisions:
            return encode_message(message)
        self._send_decisions()  # a peer rebuilds the proposal from the decisions: first
        key = (message.height, message.round)
        if key not in self._proposed:
            self._proposed[key] = message
            while len(self._proposed) > MAX_KEPT_PROPOSALS:
                self._proposed.popitem(last=False)
        return compact_proposal(message, list(message.block.digests))

    def _schedule(self, step: Step, height: int, round: int, delay: float) -> None:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.discard(handle)
            self._inputs.put_nowait(("timeout", step, height, round))

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    async def _decided(self, effect: Decided) -> None:
        block, commit = effect.block, effect.commit
        digests = list(block.digests)
        state, self._pending_state = self._pending_state, None
        stored = StoredBlock(height=block.height, id=block.id, time_ms=block.time_ms,
                             round=commit.round, block=block.encoded,
                             commit=encode_deterministic(commit.to_wire()))
        await self.store.add_block(
            stored, digests, [e.id for e in block.evidence],
            signing_state=encode_deterministic(state.to_wire()) if state else None,
            validators=encode_deterministic(_validator_set_to_wire(effect.validators)))
        self.last_block, self.last_commit = block, commit
        self.decided_at[block.height] = self.clock()
        if len(self.decided_at) > 1000:
            self.decided_at.pop(min(self.decided_at))
        for digest in digests:
            self.mempool.pop(digest, None)
        if self.diverged is not None:
            return  # our state is not the cluster's: executing more would only hide it
        executed = await self.rules.execute(block, commit)
        for offender in effect.isolated:
            log.warning("validator isolated", extra={"validator": offender,
                                                     "height": block.height})
            self.transport.drop(offender)
            if self._audit is not None:
                await self._audit("consensus.validator-isolated",
                                  {"validator": offender, "height": block.height})
        for offender in effect.refused_isolation:
            log.warning("isolation refused: it would leave fewer than 4 validators",
                        extra={"validator": offender, "height": block.height})
        for index, digest in enumerate(digests):
            outcome = executed.outcomes[index] if index < len(executed.outcomes) else None
            for future in self._waiters.pop(digest, []):
                if not future.done():
                    future.set_result(Committed(block, index, commit, outcome))
        before = {v.id for v in self.core.validators.validators if v.power == 0}
        await self._perform(self.core.executed(executed.app_hash, executed.isolate))
        encoded = self._encoded_validators()
        if encoded != self._recorded_set:  # evidence or a misissuance changed the powers
            self._recorded_set = encoded
            await self.store.record_validator_set(self.core.height, encoded)
        for offender in sorted(self.isolated - before):
            log.warning("validator isolated for misissuance",
                        extra={"validator": offender, "height": block.height})
            self.transport.drop(offender)
        if self.mempool:
            self._inputs.put_nowait(("content",))

    async def _evidence(self, evidence: DuplicateVoteEvidence) -> None:
        now = self.clock()
        self.evidence_found_at.setdefault(evidence.id, now)
        fresh = await self.store.add_evidence(StoredEvidence(
            id=evidence.id, offender=evidence.offender, height=evidence.height,
            evidence=encode_deterministic(evidence.to_wire()), found_ms=int(now * 1000),
            committed_height=None))
        if fresh:
            log.warning("equivocation evidence", extra={"validator": evidence.offender,
                                                        "height": evidence.height})
            if self._audit is not None:
                await self._audit("consensus.evidence", {
                    "id": evidence.id.hex(), "offender": evidence.offender,
                    "height": evidence.height, "round": evidence.vote_a.round})

    # --- peers ----------------------------------------------------------------------------

    def _relay(self, peer: _Peer, payload: bytes) -> None:
        """Send ``peer`` another validator's vote with the next message it gets, or after
        :data:`RELAY_DELAY` (never to the vote's own validator: it has it)."""
        if len(peer.relays) >= MAX_OUTBOX:
            del peer.relays[: MAX_OUTBOX // 2]
        peer.relays.append(payload)
        if peer.relay_timer is None:
            peer.relay_timer = asyncio.get_running_loop().call_later(
                RELAY_DELAY, self._release_relays, peer)

    def _release_relays(self, peer: _Peer) -> None:
        if peer.relay_timer is not None:
            peer.relay_timer.cancel()
            peer.relay_timer = None
        if peer.relays:
            relays, peer.relays = peer.relays, []
            self._enqueue(peer, *relays)

    def _enqueue(self, peer: _Peer, *payloads: bytes) -> None:
        if peer.relays:
            self._release_relays(peer)  # they travel with this message
        if len(peer.outbox) >= MAX_OUTBOX:
            del peer.outbox[: MAX_OUTBOX // 2]  # a dead peer: keep the newest; gossip repeats
        peer.outbox.extend(payloads)
        peer.wake.set()

    async def _sender(self, peer: _Peer) -> None:
        backoff = 0.05
        while True:
            await peer.wake.wait()
            peer.wake.clear()
            while peer.outbox:
                batch: list[bytes] = []
                size = 0
                while (peer.outbox and len(batch) < 512
                       and size + len(peer.outbox[0]) + 8 <= self.max_message_bytes):
                    size += len(peer.outbox[0]) + 8
                    batch.append(peer.outbox.pop(0))
                if not batch:  # one message above the batch limit: drop it
                    peer.outbox.pop(0)
                    continue
                if peer.id in self.isolated:
                    peer.outbox.clear()
                    break
                try:
                    await self.transport.send(peer.id, batch)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    peer.connected = False
                    peer.last_error = f"{type(exc).__name__}: {exc}"
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue  # the batch is lost; the gossip tick re-sends what matters
                peer.connected = True
                peer.sent += len(batch)
                backoff = 0.05

    def _peer_behind(self, validator: str, height: int) -> None:
        """Help a peer still at a height this validator decided, more each time the core
        reports it (at most once a gossip tick): first only note it; then send the
        height's commit as its precommits (a few hundred octets); then the whole block
        with its commit. Under load a validator is often a moment behind the quorum (a
        precommit is on its way, or its loop is busy) and decides by itself, or with
        the precommits alone, since it holds the block it voted for; sending every such
        peer the whole block (up to n - 1 copies of each height) cost more than the
        blocks' decisions themselves."""
        key = (validator, height)
        stage = self._behind.get(key, 0)
        self._behind[key] = stage + 1
        while len(self._behind) > MAX_BEHIND_NOTED:
            del self._behind[next(iter(self._behind))]
        if stage >= 1:
            self._serve_behind(validator, height, whole=stage >= 2)

    def _serve_behind(self, validator: str, height: int, *, whole: bool) -> None:
        """Send the peer the block it lacks with its commit (``whole``), or only the
        commit's precommits, less the peer's own."""
        peer = self.peers.get(validator)
        stored = self.store.block(height)
        if peer is None or stored is None:
            return
        if whole:
            self._enqueue(peer, decided_message(stored.block, stored.commit))
            return
        commit = Commit.from_wire(decode_item(stored.commit))
        self._enqueue(peer, *(encode_message(v) for v in commit.precommits
                              if v.validator != validator))

    def _start_sync(self, validator: str, start: int) -> None:
        if self._syncing or validator not in self.peers:
            return
        self._syncing = True
        task = asyncio.get_running_loop().create_task(self._sync(validator, start))
        self._tasks.append(task)

    async def _sync(self, validator: str, start: int) -> None:
        """Fetch decided blocks with their commits from ``validator`` and feed them in order."""
        try:
            height = start
            while True:
                pairs = await self.transport.fetch_blocks(validator, height, SYNC_BATCH)
                if not pairs:
                    return
                for block_bytes, commit_bytes in pairs:
                    try:
                        message = CommitMessage(Block.from_wire(decode_item(block_bytes)),
                                                Commit.from_wire(decode_item(commit_bytes)))
                    except (BadMessage, ValueError) as exc:
                        self._misbehaved(validator, f"served a malformed block: {exc}")
                        return
                    await self._precheck(message.block)
                    self._inputs.put_nowait(("message", message, validator))
                    height = message.block.height + 1
                if len(pairs) < SYNC_BATCH:
                    return
                while self.core.height < height:  # let the core apply them first
                    await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("block sync from %s failed: %s", validator, exc)
        finally:
            self._syncing = False

    # --- status ---------------------------------------------------------------------------

    def _encoded_validators(self) -> bytes:
        return encode_deterministic(_validator_set_to_wire(self.core.validators))

    def validators_at(self, height: int) -> ValidatorSet | None:
        """The validator set that decides ``height`` (its commit's signers and powers);
        None for a height not reached or from before sets were recorded."""
        if height > self.core.height:
            return None
        raw = self.store.validator_set_at(height)
        if raw is None:
            return None
        return _validator_set_from_wire(decode_item(raw), self.genesis_validators)

    def blocks(self, start: int, limit: int) -> list[StoredBlock]:
        """Up to ``limit`` blocks from ``start``, no more than fit in one frame (at least one)."""
        found: list[StoredBlock] = []
        size = 0
        for stored in self.store.blocks(start, limit):
            size += len(stored.block) + len(stored.commit) + 32
            if found and size > self.max_message_bytes:
                break
            found.append(stored)
        return found

    def status(self) -> dict[str, Any]:
        core = self.core
        isolated = self.isolated
        last = self.last_block
        return {
            "chain_id": self.chain_id,
            "validator": self.me,
            "height": core.height,
            "round": core.round,
            "step": core.step,
            "validators": [{"id": v.id, "name": self.names.get(v.id, v.id[:8]),
                            "power": v.power, "address": v.address, "port": v.port,
                            "isolated": v.id in isolated}
                           for v in core.validators.validators],
            "last_block": None if last is None else {
                "height": last.height, "id": last.id, "time_ms": last.time_ms,
                "decisions": len(last.decisions)},
            "peers": [{"id": p.id, "name": p.name, "connected": p.connected,
                       "queued": len(p.outbox), "last_error": p.last_error}
                      for p in self.peers.values()],
            "evidence": [{"id": e.id, "offender": e.offender, "height": e.height,
                          "found_ms": e.found_ms, "committed_height": e.committed_height}
                         for e in self.store.evidence()],
            "isolated": sorted(isolated),
            "mempool": len(self.mempool),
            "proposals": dict(self.proposals),
            "decision_groups": dict(self.decision_groups),
            "misbehaviour": len(self.misbehaviour),
            "diverged": self.diverged,
        }


def _validator_set_to_wire(validators: ValidatorSet) -> list[Any]:
    return [[v.public_key, v.power] for v in validators.validators]


def _validator_set_from_wire(item: Any, configured: ValidatorSet) -> ValidatorSet:
    """The stored powers applied to the configured validators (addresses come from config)."""
    powers = {bytes(key): power for key, power in item}
    return ValidatorSet(tuple(replace(v, power=powers.get(v.public_key, v.power))
                              for v in configured.validators))

