"""A seeded discrete-event network that drives several :class:`Tendermint` cores.

Everything random (latency, drops, the application's decisions, keys) comes
from the seed, and time is virtual, so a run is exactly reproducible and a
minute of consensus takes milliseconds. The network can drop messages at a
rate, cut the cluster into partitions for a while, and crash a node and start
it again from what it persisted (its last :class:`PersistSigningState`, with
its lock and locked block, and its decided blocks; with ``wire``, the state
goes through its CBOR encoding, as a driver stores it). Faulty validators are
simulated here, with their own keys, rather than by patching the core:

- ``"equivocate"``: runs an honest core, but every proposal and vote it signs
  goes to one half of its peers, and a conflicting one (signed with the same
  key) to the other half;
- ``"silent"``: never sends anything;
- ``"invalid"``: proposes blocks the honest application rejects.

The checks (:meth:`Simulation.check`) are the safety properties: agreement,
validity, and no honest validator signing two conflicting messages.

Test code, not product: it lives in ``tests/`` and drives the public
:mod:`handlers.consensus.bft` API only.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from handlers.consensus.bft import (
    Application,
    Block,
    Broadcast,
    CommitMessage,
    Decided,
    DuplicateVoteEvidence,
    Effect,
    EvidenceFound,
    Message,
    Misbehaviour,
    NeedBlocks,
    PeerBehind,
    PersistSigningState,
    Proposal,
    ScheduleTimeout,
    SendTo,
    SigningState,
    Tendermint,
    Timeouts,
    Validator,
    ValidatorSet,
    Vote,
    decode_message,
    encode_message,
    validator_id,
)
from protocol import decode_item, encode_deterministic

Behaviour = Literal["honest", "equivocate", "silent", "invalid"]

DEFAULT_TIMEOUTS = Timeouts()
MAX_FETCH = 64
"""Decided blocks served per :class:`NeedBlocks` request."""


def make_key(seed: int, index: int) -> Ed25519PrivateKey:
    """Validator ``index``'s key, derived from the seed (reproducible runs)."""
    return Ed25519PrivateKey.from_private_bytes(
        hashlib.sha256(f"trustchain-bft-sim/{seed}/{index}".encode()).digest())


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def genesis_proposer(n_validators: int, seed: int, height: int, round: int) -> int:
    """The index of the node that proposes (height, round) before any isolation (to pick
    which node to make faulty)."""
    ids = [validator_id(public_bytes(make_key(seed, i))) for i in range(n_validators)]
    validators = ValidatorSet(tuple(Validator(public_bytes(make_key(seed, i)))
                                    for i in range(n_validators)))
    return ids.index(validators.proposer(height, round))


def well_formed(block: Block) -> bool:
    """The test application's validity: every decision is ``b"ok:"`` and 8 bytes."""
    return all(d.startswith(b"ok:") and len(d) == 11 for d in block.decisions)


class SimApp:
    """A test application: a few random well-formed decisions per block, virtual time.

    With ``bad``, it proposes malformed decisions (and accepts anything), as a
    faulty proposer would.
    """

    def __init__(self, clock: Callable[[], float], rng: random.Random, *,
                 bad: bool = False) -> None:
        self._clock = clock
        self._rng = rng
        self.bad = bad

    def proposal(self, height: int, round: int) -> tuple[int, tuple[bytes, ...]] | None:
        time_ms = int(self._clock() * 1000) + height
        if self.bad:
            return time_ms, (b"bad decision",)
        count = self._rng.randint(1, 3)
        return time_ms, tuple(b"ok:" + self._rng.randbytes(8) for _ in range(count))

    def valid(self, block: Block) -> bool:
        return self.bad or well_formed(block)

    def precommit_extension(self, block: Block) -> bytes:
        return b"cosig:" + block.id[:8]


AppFactory = Callable[[int, "Simulation"], Application]


@dataclass
class SimNode:
    """One validator of the simulation, and what it made durable."""

    index: int
    key: Ed25519PrivateKey
    id: str
    behaviour: Behaviour
    app: Application
    validators: ValidatorSet
    """The set for the height after its last decision (what it would reload)."""
    core: Tendermint | None = None
    alive: bool = True
    incarnation: int = 0
    restart_pending: bool = False
    persisted: SigningState | None = None
    decided: dict[int, CommitMessage] = field(default_factory=dict)
    decisions: list[Decided] = field(default_factory=list)
    signed: list[Proposal | Vote] = field(default_factory=list)
    evidence_found: list[DuplicateVoteEvidence] = field(default_factory=list)
    misbehaviour: list[Misbehaviour] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)
    fetch_until: float = -1.0
    twins: dict[tuple[int, int, int], Proposal | Vote] = field(default_factory=dict)

    @property
    def height(self) -> int:
        """The highest height it decided (0 for none)."""
        return max(self.decided, default=0)


class Simulation:
    """A cluster of ``n_validators`` cores on a virtual network, seeded by ``seed``."""

    def __init__(self, n_validators: int, seed: int, *,
                 byzantine: Mapping[int, Behaviour] | None = None,
                 latency: tuple[float, float] = (0.01, 0.05), drop_rate: float = 0.0,
                 timeouts: Timeouts = DEFAULT_TIMEOUTS, gossip_interval: float = 0.5,
                 app_factory: AppFactory | None = None, relay: bool = True,
                 wire: bool = False, chain_id: str = "trustchain-sim") -> None:
        self.seed = seed
        self.rng = random.Random(f"network/{seed}")
        self.latency = latency
        self.drop_rate = drop_rate
        self.timeouts = timeouts
        self.gossip_interval = gossip_interval
        self.relay = relay
        self.wire = wire
        self.chain_id = chain_id
        self.now = 0.0
        self.events = 0
        self.stats: Counter[str] = Counter()
        self.first_decided_at: dict[int, float] = {}
        self.violations: list[str] = []
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._groups: dict[int, int] | None = None
        self._partition_id = 0
        given = dict(byzantine or {})
        self.behaviours: list[Behaviour] = [given.get(i, "honest") for i in range(n_validators)]
        keys = [make_key(seed, i) for i in range(n_validators)]
        self.genesis = ValidatorSet(tuple(Validator(public_bytes(k)) for k in keys))
        factory = app_factory or self._default_app
        self.nodes: list[SimNode] = [
            SimNode(index=i, key=key, id=validator_id(public_bytes(key)),
                    behaviour=self.behaviours[i], app=factory(i, self),
                    validators=self.genesis)
            for i, key in enumerate(keys)]
        self.index_of = {node.id: node.index for node in self.nodes}
        for node in self.nodes:
            if node.behaviour == "silent":
                node.alive = False
            else:
                self._at(0.0, partial(self._boot, node))

    def _default_app(self, index: int, sim: Simulation) -> Application:
        return SimApp(self.clock, random.Random(f"app/{self.seed}/{index}"),
                      bad=self.behaviours[index] == "invalid")

    def clock(self) -> float:
        return self.now

    @property
    def honest(self) -> list[SimNode]:
        return [n for n in self.nodes if n.behaviour == "honest"]

    # --- scenario controls -------------------------------------------------------------------

    def partition(self, groups: Sequence[Iterable[int]], *, at: float = 0.0,
                  heal_at: float | None = None) -> None:
        """From ``at`` (until ``heal_at``), drop messages between different groups of node
        indices; a node in no group is alone."""
        mapping = {i: g for g, members in enumerate(groups) for i in members}

        def cut() -> None:
            self._partition_id += 1
            self._groups = mapping
            self.stats["partitions"] += 1
            if heal_at is not None:
                pid = self._partition_id
                self._at(heal_at, lambda: self._heal(pid))

        self._at(at, cut)

    def _heal(self, partition_id: int) -> None:
        if partition_id == self._partition_id:
            self._groups = None

    def heal(self, *, at: float) -> None:
        """Remove whatever partition is in force at ``at``."""
        self._at(at, lambda: setattr(self, "_groups", None))

    def crash(self, index: int, *, at: float, restart_at: float | None = None) -> None:
        """Stop node ``index`` at ``at`` (losing everything not persisted); restart it from
        its persisted signing state and decided blocks at ``restart_at``."""
        node = self.nodes[index]

        def down() -> None:
            node.alive = False
            node.core = None
            node.incarnation += 1
            node.counters["crashes"] += 1

        def up() -> None:
            node.alive = True
            node.restart_pending = False
            node.incarnation += 1
            node.counters["restarts"] += 1
            self._boot(node)

        if restart_at is not None:
            node.restart_pending = True
            self._at(restart_at, up)
        self._at(at, down)

    # --- running -------------------------------------------------------------------------------

    def run_until(self, time: float | None = None, *, height: int | None = None,
                  stop: Callable[[], bool] | None = None, max_events: int = 400_000) -> bool:
        """Run until virtual ``time``, or until every honest node that is up (or will be)
        decided ``height``, or ``stop()`` holds, whichever comes first; True if the goal
        (``height`` or ``stop``; else ``time``) was reached. Gives up (False) after
        ``max_events`` events."""
        budget = self.events + max_events
        while True:
            if ((height is not None and self.all_decided(height))
                    or (stop is not None and stop())):
                return True
            if not self._queue or self.events >= budget:
                return False
            when = self._queue[0][0]
            if time is not None and when > time:
                self.now = time
                return height is None and stop is None
            _, _, action = heapq.heappop(self._queue)
            self.now = when
            self.events += 1
            action()

    def all_decided(self, height: int) -> bool:
        return all(n.height >= height for n in self.honest if n.alive or n.restart_pending)

    def _at(self, when: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, action))

    def _boot(self, node: SimNode) -> None:
        """Start (or restart) a node's core from what it persisted."""
        last = node.height
        previous = node.decided[last].block if last else None
        committed = [e.id for cm in node.decided.values() for e in cm.block.evidence]
        node.core = Tendermint(chain_id=self.chain_id, validators=node.validators,
                               app=node.app, me=node.id, sign=node.key.sign,
                               height=last + 1, previous=previous,
                               signing_state=node.persisted, timeouts=self.timeouts,
                               relay=self.relay and node.behaviour != "equivocate",
                               committed_evidence=committed)
        self._perform(node, node.core.start())
        incarnation = node.incarnation
        self._at(self.now + self.rng.uniform(0, self.gossip_interval),
                 lambda: self._gossip(node, incarnation))

    def _gossip(self, node: SimNode, incarnation: int) -> None:
        if node.incarnation != incarnation or node.core is None:
            return
        self._perform(node, node.core.gossip())
        self._at(self.now + self.gossip_interval, lambda: self._gossip(node, incarnation))

    def _timeout(self, node: SimNode, incarnation: int, timeout: ScheduleTimeout) -> None:
        if node.incarnation != incarnation or node.core is None:
            return
        self.stats["timeouts"] += 1
        self._perform(node, node.core.on_timeout(timeout.step, timeout.height, timeout.round))

    def _deliver(self, node: SimNode, payload: Message | bytes, sender: str) -> None:
        if node.core is None:
            return
        message = decode_message(payload) if isinstance(payload, bytes) else payload
        self.stats["delivered"] += 1
        if isinstance(message, CommitMessage):
            node.counters["commit_messages"] += 1
        self._perform(node, node.core.receive(message, sender))

    # --- effects -------------------------------------------------------------------------------

    def _perform(self, node: SimNode, effects: list[Effect]) -> None:
        """Do what the core asked, in order (a crash only ever falls between events)."""
        incarnation = node.incarnation
        for effect in effects:
            if isinstance(effect, Broadcast):
                self._broadcast(node, effect.message)
            elif isinstance(effect, SendTo):
                self._own_signed(node, effect.message)
                target = self.index_of.get(effect.validator)
                if target is not None:
                    self._send(node, self.nodes[target], effect.message)
            elif isinstance(effect, ScheduleTimeout):
                self._at(self.now + effect.delay,
                         partial(self._timeout, node, incarnation, effect))
            elif isinstance(effect, PersistSigningState):
                if self.wire:  # what a driver stores and reads back
                    node.persisted = SigningState.from_wire(
                        decode_item(encode_deterministic(effect.state.to_wire())))
                else:
                    node.persisted = replace(effect.state)
            elif isinstance(effect, Decided):
                self._decided(node, effect)
            elif isinstance(effect, EvidenceFound):
                node.evidence_found.append(effect.evidence)
            elif isinstance(effect, Misbehaviour):
                node.misbehaviour.append(effect)
            elif isinstance(effect, PeerBehind):
                decided = node.decided.get(effect.height)
                target = self.index_of.get(effect.validator)
                if decided is not None and target is not None:
                    node.counters["peer_behind"] += 1
                    self._send(node, self.nodes[target], decided)
            elif isinstance(effect, NeedBlocks):
                self._fetch(node, effect)

    def _decided(self, node: SimNode, effect: Decided) -> None:
        height = effect.block.height
        earlier = node.decided.get(height)
        if earlier is not None and earlier.block.id != effect.block.id:
            self.violations.append(f"node {node.index} decided two blocks at height {height}")
        node.decided[height] = CommitMessage(effect.block, effect.commit)
        node.decisions.append(effect)
        node.validators = effect.validators
        self.stats["decisions"] += 1
        if node.behaviour == "honest":
            self.first_decided_at.setdefault(height, self.now)

    @staticmethod
    def _is_own(node: SimNode, message: Message) -> bool:
        return ((isinstance(message, Vote) and message.validator == node.id)
                or (isinstance(message, Proposal) and message.proposer == node.id))

    def _own_signed(self, node: SimNode, message: Message) -> None:
        if self._is_own(node, message):
            assert isinstance(message, (Proposal, Vote))
            node.signed.append(message)

    def _broadcast(self, node: SimNode, message: Message) -> None:
        self._own_signed(node, message)
        peers = [n for n in self.nodes if n.index != node.index]
        if node.behaviour == "equivocate":
            if isinstance(message, DuplicateVoteEvidence) and message.offender == node.id:
                return  # it does not spread evidence against itself
            if isinstance(message, (Proposal, Vote)) and self._is_own(node, message):
                half = (len(peers) + 1) // 2
                twin = self._twin(node, message)
                node.signed.append(twin)
                for peer in peers[:half]:
                    self._send(node, peer, message)
                for peer in peers[half:]:
                    self._send(node, peer, twin)
                return
        for peer in peers:
            self._send(node, peer, message)

    def _twin(self, node: SimNode, message: Proposal | Vote) -> Proposal | Vote:
        """The conflicting message an equivocating node sends its other half (fixed per slot)."""
        if isinstance(message, Vote):
            key = (message.height, message.round, int(message.type))
        else:
            key = (message.height, message.round, 0)
        twin = node.twins.get(key)
        if twin is not None:
            return twin
        sign = node.key.sign
        if isinstance(message, Vote):
            other = (None if message.block_id is not None
                     else hashlib.sha256(b"twin" + repr(key).encode()).digest())
            twin = replace(message, block_id=other, extension=b"").signed(self.chain_id, sign)
        else:
            block = replace(message.block,
                            decisions=(*message.block.decisions, b"ok:twin-blk"))
            twin = replace(message, block=block).signed(self.chain_id, sign)
        node.twins[key] = twin
        return twin

    def _cut(self, a: int, b: int) -> bool:
        groups = self._groups
        return groups is not None and groups.get(a, -1 - a) != groups.get(b, -1 - b)

    def _lost(self, a: int, b: int) -> bool:
        """Whether a message from ``a`` to ``b`` sent now is lost (partition or drop)."""
        if self._cut(a, b):
            self.stats["cut"] += 1
            return True
        if self.drop_rate and self.rng.random() < self.drop_rate:
            self.stats["dropped"] += 1
            return True
        return False

    def _send(self, node: SimNode, peer: SimNode, message: Message) -> None:
        self.stats["sent"] += 1
        if peer.index == node.index or self._lost(node.index, peer.index):
            return
        payload: Message | bytes = encode_message(message) if self.wire else message
        if isinstance(payload, bytes):
            self.stats["bytes"] += len(payload)
        self._at(self.now + self.rng.uniform(*self.latency),
                 lambda: self._deliver(peer, payload, node.id))

    def _fetch(self, node: SimNode, need: NeedBlocks) -> None:
        """Ask ``need.validator`` for decided blocks; it answers with one batch, applied in
        order (one request in flight per node)."""
        index = self.index_of.get(need.validator)
        source = None if index is None else self.nodes[index]
        if source is None or source is node or self.now < node.fetch_until:
            return
        node.fetch_until = self.now + 4 * self.latency[1]
        node.counters["fetches"] += 1
        if self._lost(node.index, source.index):
            return

        def serve() -> None:
            if source.core is None:
                return
            heights = range(need.from_height, need.from_height + MAX_FETCH)
            batch = [source.decided[h] for h in heights if h in source.decided]
            if batch and not self._lost(source.index, node.index):
                self._at(self.now + self.rng.uniform(*self.latency), lambda: apply(batch))

        def apply(batch: list[CommitMessage]) -> None:
            for decided in batch:
                if node.core is None:
                    return
                node.counters["fetched_blocks"] += 1
                self._perform(node, node.core.receive(decided, source.id))

        self._at(self.now + self.rng.uniform(*self.latency), serve)

    # --- checks -------------------------------------------------------------------------------

    def chain(self) -> dict[int, Block]:
        """The decided blocks of the honest node that decided the most."""
        best = max(self.honest, key=lambda n: n.height, default=None)
        return {} if best is None else {h: cm.block for h, cm in sorted(best.decided.items())}

    def check_agreement(self) -> None:
        """No two honest nodes decide different blocks at a height."""
        by_height: dict[int, set[bytes]] = {}
        for node in self.honest:
            for height, decided in node.decided.items():
                by_height.setdefault(height, set()).add(decided.block.id)
        forks = sorted(h for h, ids in by_height.items() if len(ids) > 1)
        assert not forks and not self.violations, f"fork at heights {forks} {self.violations}"

    def check_validity(self) -> None:
        """Every decided block is well formed and extends the one before it."""
        for node in self.honest:
            for height, decided in node.decided.items():
                block = decided.block
                assert block.height == height, f"node {node.index}: block height {height}"
                assert well_formed(block), f"node {node.index} decided an invalid block"
                before = node.decided.get(height - 1)
                if before is not None:
                    assert block.previous == before.block.id, f"broken chain at {height}"
                    assert block.time_ms > before.block.time_ms, f"time went back at {height}"

    def check_no_double_sign(self) -> None:
        """No honest validator signed two different blocks (or block and nil) for one slot."""
        for node in self.honest:
            slots: dict[tuple[int, int, int], set[bytes | None]] = {}
            for message in node.signed:
                if isinstance(message, Vote):
                    slot = (message.height, message.round, int(message.type))
                    slots.setdefault(slot, set()).add(message.block_id)
                else:
                    slot = (message.height, message.round, 0)
                    slots.setdefault(slot, set()).add(message.block.id)
            doubles = sorted(s for s, ids in slots.items() if len(ids) > 1)
            assert not doubles, f"node {node.index} double-signed at {doubles}"

    def check(self) -> None:
        self.check_agreement()
        self.check_validity()
        self.check_no_double_sign()

    def committed_evidence(self) -> dict[str, list[int]]:
        """Offender id -> heights at which evidence against it was committed."""
        found: dict[str, list[int]] = {}
        for height, block in self.chain().items():
            for evidence in block.evidence:
                found.setdefault(evidence.offender, []).append(height)
        return found

    def isolated(self) -> set[str]:
        """Validators with no voting power after the latest honest decision."""
        best = max(self.honest, key=lambda n: n.height)
        return {v.id for v in best.validators.validators if v.power == 0}
