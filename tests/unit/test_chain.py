"""The consensus driver with one validator (n = 1): decisions commit in blocks that fit
a frame, the chain survives a restart, and a resubmitted decision is not committed twice."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from handlers.consensus import Committed, ConsensusChain, OpenRules
from handlers.consensus.bft import Validator, ValidatorSet
from handlers.consensus.bft._core import Timeouts
from store import ChainStore


class NoPeers:
    """The transport of a validator that is alone: there is nobody to reach."""

    async def send(self, validator: str, messages: list[bytes]) -> None:
        raise AssertionError("a single validator sends nothing")

    async def fetch_blocks(self, validator: str, start: int,
                           limit: int) -> list[tuple[bytes, bytes]]:
        raise AssertionError("a single validator fetches nothing")

    def drop(self, validator: str) -> None:
        raise AssertionError("a single validator isolates nobody")


KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
ME = Validator(KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def _chain(path: Path, rules: OpenRules | None = None, **kwargs: object) -> ConsensusChain:
    return ConsensusChain(chain_id="unit", validators=ValidatorSet((ME,)),
                          store=ChainStore(path / "chain.sqlite3"), transport=NoPeers(),
                          rules=rules or OpenRules(), me=ME.id, sign=KEY.sign,
                          timeouts=Timeouts(), block_interval=60.0, **kwargs)  # type: ignore[arg-type]


async def test_blocks_fit_in_a_frame_and_survive_a_restart(tmp_path: Path) -> None:
    chain = _chain(tmp_path, max_frame_size=16384)
    await chain.start()
    decisions = [os.urandom(1000) for _ in range(40)]
    try:
        committed = await asyncio.gather(*(chain.submit(d, timeout=10) for d in decisions))
    finally:
        await chain.stop()
    heights = {c.block.height for c in committed}
    assert len(heights) >= 4  # 40 KB of decisions cannot share one 6 KB block
    for c in committed:
        assert len(c.block.encoded) <= chain.max_block_bytes + 4096
        assert c.block.decisions[c.index] in decisions
        assert len(c.commit.precommits) == 1
    served = chain.blocks(1, 256)
    assert sum(len(b.block) + len(b.commit) for b in served) <= chain.max_message_bytes + 4096
    assert 1 <= len(served) < max(heights)  # capped by size, not by the limit asked
    chain.store.close()
    # restart: the chain continues after its last block, and knows what it committed
    again = _chain(tmp_path, max_frame_size=16384)
    assert again.core.height == max(heights) + 1
    await again.start()
    try:
        repeat = await again.submit(decisions[0], timeout=10)
        assert repeat.block.height == committed[0].block.height  # not committed twice
        fresh = await again.submit(b"after the restart", timeout=10)
        assert fresh.block.height == max(heights) + 1
        last = max((c.block for c in committed), key=lambda b: b.height)
        assert fresh.block.previous == last.id
    finally:
        await again.stop()
        again.store.close()


async def test_a_validator_alone_makes_no_empty_blocks(tmp_path: Path) -> None:
    chain = ConsensusChain(chain_id="unit", validators=ValidatorSet((ME,)),
                           store=ChainStore(tmp_path / "chain.sqlite3"), transport=NoPeers(),
                           rules=OpenRules(), me=ME.id, sign=KEY.sign, timeouts=Timeouts(),
                           block_interval=0.05, gossip_interval=0.05)
    await chain.start()
    try:
        committed = await chain.submit(b"one decision", timeout=10)
        await asyncio.sleep(0.5)  # ten block intervals
        assert chain.store.latest() is not None
        assert chain.store.latest().height == committed.block.height == 1  # type: ignore[union-attr]
        second = await chain.submit(b"another", timeout=10)
        assert second.block.height == 2
    finally:
        await chain.stop()
        chain.store.close()


Lose = Callable[[str, str, dict[str, Any]], bool]
"""``(sender, receiver, message)``: True to lose the message on the way."""


class InProcessLinks:
    """Two validators in one process: a send is the other's ``receive``, but for the
    messages ``lose`` drops; ``fetch`` False: blocks cannot be fetched (a validator that
    is behind then catches up only from the commits its peers send it)."""

    def __init__(self, me: str, chains: dict[str, ConsensusChain], lose: Lose,
                 fetch: bool = True) -> None:
        self.me, self.chains, self.lose, self.fetch = me, chains, lose, fetch
        self.delivered: list[tuple[str, str]] = []
        """(receiver, kind) of every message delivered."""
        self.votes: list[tuple[str, str]] = []
        """(receiver, the vote's validator) of every vote delivered."""
        self.late: Callable[[str, dict[str, Any]], bool] = lambda receiver, message: False
        """``(receiver, message)``: True to deliver the message 0.1 s later than the rest."""
        self._late: set[asyncio.Task[int]] = set()

    async def send(self, validator: str, messages: list[bytes]) -> None:
        kept = [m for m in messages if not self.lose(self.me, validator, cbor2.loads(m))]
        self.delivered += [(validator, cbor2.loads(m)["kind"]) for m in kept]
        self.votes += [(validator, cbor2.loads(m)["validator"]) for m in kept
                       if cbor2.loads(m)["kind"] == "vote"]
        late = [m for m in kept if self.late(validator, cbor2.loads(m))]
        if late:
            task = asyncio.get_running_loop().create_task(self._deliver_late(validator, late))
            self._late.add(task)
            task.add_done_callback(self._late.discard)
        await self.chains[validator].receive([m for m in kept if m not in late],
                                             sender=self.me)

    async def _deliver_late(self, validator: str, messages: list[bytes]) -> int:
        await asyncio.sleep(0.1)
        return await self.chains[validator].receive(messages, sender=self.me)

    async def fetch_blocks(self, validator: str, start: int,
                           limit: int) -> list[tuple[bytes, bytes]]:
        if not self.fetch:
            raise ConnectionError("blocks cannot be fetched in this test")
        return [(b.block, b.commit) for b in self.chains[validator].blocks(start, limit)]

    def drop(self, validator: str) -> None:
        raise AssertionError("nobody misbehaves here")


PAIR_KEYS = [Ed25519PrivateKey.from_private_bytes(bytes([i + 7]) * 32) for i in range(2)]
PAIR = ValidatorSet(tuple(Validator(k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
                          for k in PAIR_KEYS))
PAIR_IDS = [Validator(k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).id
            for k in PAIR_KEYS]


def _nothing_lost(sender: str, receiver: str, message: dict[str, Any]) -> bool:
    return False


async def _pair(tmp_path: Path, lose: Lose = _nothing_lost,
                fetch: bool = True) -> list[ConsensusChain]:
    return await _cluster(tmp_path, PAIR_KEYS, lose, fetch)


async def _cluster(tmp_path: Path, keys: list[Ed25519PrivateKey], lose: Lose = _nothing_lost,
                   fetch: bool = True) -> list[ConsensusChain]:
    validators = ValidatorSet(tuple(
        Validator(k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)) for k in keys))
    ids = [Validator(k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).id
           for k in keys]
    chains: dict[str, ConsensusChain] = {}
    for key, me in zip(keys, ids, strict=True):
        (tmp_path / me[:8]).mkdir()
        chains[me] = ConsensusChain(
            chain_id="unit", validators=validators,
            store=ChainStore(tmp_path / me[:8] / "chain.sqlite3"),
            transport=InProcessLinks(me, chains, lose, fetch), rules=OpenRules(), me=me,
            sign=key.sign, timeouts=Timeouts(propose=0.3, prevote=0.2, precommit=0.2,
                                             delta=0.1),
            block_interval=60.0, gossip_interval=0.2)
    for chain in chains.values():
        await chain.start()
    return [chains[i] for i in ids]


async def test_proposals_travel_compact_and_are_rebuilt_from_the_mempool(
        tmp_path: Path) -> None:
    chains = await _pair(tmp_path)
    try:
        decisions = [os.urandom(500) for _ in range(6)]
        committed = await asyncio.gather(*(chains[0].submit(d, timeout=20)
                                           for d in decisions))
    finally:
        for chain in chains:
            await chain.stop()
    assert {c.block.decisions[c.index] for c in committed} == set(decisions)
    counts = [chain.status()["proposals"] for chain in chains]
    assert sum(c["rebuilt"] for c in counts) >= 1
    assert sum(c["wanted"] for c in counts) == 0


async def test_a_compact_proposal_waits_for_decisions_still_on_their_way(
        tmp_path: Path) -> None:
    """B gets A's decisions a moment after A's proposal naming them: it rebuilds the
    proposal when they arrive instead of asking for it whole."""
    a, b = PAIR_IDS
    chains = await _pair(tmp_path)
    links = chains[0].transport
    assert isinstance(links, InProcessLinks)
    try:
        for _ in range(4):  # to a height A proposes, which B has reached too
            await asyncio.sleep(0.1)
            if chains[0].core.validators.proposer(chains[0].core.height, 0) == a:
                break
            await chains[0].submit(os.urandom(100), timeout=20)
        links.late = lambda receiver, message: receiver == b and \
            message["kind"] == "decisions"
        decision = os.urandom(500)
        committed = await chains[0].submit(decision, timeout=20)
    finally:
        for chain in chains:
            await chain.stop()
    assert committed.block.decisions == (decision,)
    assert committed.block.proposer == a
    counts = chains[1].status()["proposals"]
    assert counts["waited"] >= 1
    assert counts["wanted"] == 0


async def test_a_validator_that_missed_a_decision_asks_for_the_whole_proposal(
        tmp_path: Path) -> None:
    def starve(sender: str, receiver: str, message: dict[str, Any]) -> bool:
        return receiver == PAIR_IDS[1] and message["kind"] == "decisions"

    chains = await _pair(tmp_path, starve)
    try:
        decision = os.urandom(500)
        committed = await chains[0].submit(decision, timeout=20)
        for _ in range(100):  # the starved validator decides the same block
            if chains[1].last_block is not None and chains[1].last_block.height >= \
                    committed.block.height:
                break
            await asyncio.sleep(0.05)
    finally:
        for chain in chains:
            await chain.stop()
    assert committed.block.decisions[committed.index] == decision
    assert chains[1].store.decision(hashlib.sha256(decision).digest()) is not None
    assert chains[1].status()["proposals"]["wanted"] >= 1
    assert chains[0].status()["proposals"]["served"] >= 1


async def _submit_until_b_decides(chains: list[ConsensusChain]) -> Committed:
    """Submit one decision through A, wait (at most 10 s) until B has decided a block,
    and stop both."""
    try:
        committed = await chains[0].submit(os.urandom(200), timeout=20)
        for _ in range(200):
            if chains[1].last_block is not None:
                break
            await asyncio.sleep(0.05)
    finally:
        for chain in chains:
            await chain.stop()
    return committed


async def test_a_validator_still_behind_two_gossip_intervals_later_gets_the_decided_block(
        tmp_path: Path) -> None:
    """B never gets A's precommits, so only A can decide; B, behind, keeps sending its
    votes of that height. A does not answer the first with anything (a peer a moment
    behind decides by itself), the second with the commit's precommits (lost here
    too), and the third with the whole block; B cannot fetch blocks here, so that
    commit is how it decides."""
    a, b = PAIR_IDS

    def lose(sender: str, receiver: str, message: dict[str, Any]) -> bool:
        return (sender, receiver) == (a, b) and message["kind"] == "vote" \
            and message["type"] == 2

    chains = await _pair(tmp_path, lose, fetch=False)
    committed = await _submit_until_b_decides(chains)
    assert chains[1].last_block is not None
    assert chains[1].last_block.id == committed.block.id
    links = chains[0].transport
    assert isinstance(links, InProcessLinks)
    assert 1 <= links.delivered.count((b, "decided")) <= 2
    # the grace itself: the first report of a peer behind sends nothing, the second
    # the precommits, the third the block
    peer = chains[0].peers[b]
    peer.outbox.clear()
    for _ in range(3):  # nothing stored to send
        chains[0]._peer_behind(b, committed.block.height + 100)
    assert peer.outbox == []
    fresh = (b, committed.block.height)
    chains[0]._behind.pop(fresh, None)
    chains[0]._peer_behind(*fresh)
    assert peer.outbox == []
    chains[0]._peer_behind(*fresh)
    sent = [cbor2.loads(m) for m in peer.outbox]
    assert [(m["kind"], m["type"], m["validator"], m["block_id"]) for m in sent] == [
        ("vote", 2, a, committed.block.id)]  # A's precommit: B has its own
    peer.outbox.clear()
    chains[0]._peer_behind(*fresh)
    assert [cbor2.loads(m)["kind"] for m in peer.outbox] == ["decided"]


class GatedRules(OpenRules):
    """Refuses decisions that start with b"bad"; a check waits for ``gate`` if the
    decision starts with b"slow" (as a proof check waits for a worker)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.asked: list[bytes] = []

    async def check(self, decision: bytes, validators: ValidatorSet,
                    sender: str | None = None) -> str | None:
        self.asked.append(decision)
        if decision.startswith(b"slow"):
            await self.gate.wait()
        return "bad" if decision.startswith(b"bad") else None


async def test_a_decision_is_checked_once_and_concurrent_askers_share_the_verdict(
        tmp_path: Path) -> None:
    rules = GatedRules()
    chain = _chain(tmp_path, rules=rules)
    try:
        # a check that never waits leaves nothing behind but its verdict
        assert await chain._check(b"bad one") == "bad"
        assert await chain._check(b"bad one") == "bad"
        assert chain._checking == {}
        # one that waits: the askers meanwhile share it, and the check runs once
        askers = [asyncio.ensure_future(chain._check(b"slow one")) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert not any(a.done() for a in askers)
        rules.gate.set()
        assert await asyncio.gather(*askers) == [None, None, None]
        assert rules.asked == [b"bad one", b"slow one"]
        assert chain._checking == {}
        # a cancelled check: whoever shared it is cancelled too, and a new ask checks again
        rules.gate.clear()
        first = asyncio.ensure_future(chain._check(b"slow two"))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(chain._check(b"slow two"))
        await asyncio.sleep(0.01)
        first.cancel()
        await asyncio.sleep(0.01)
        assert first.cancelled() and second.cancelled() and chain._checking == {}
        rules.gate.set()
        assert await chain._check(b"slow two") is None
        assert rules.asked.count(b"slow two") == 2
    finally:
        chain.store.close()


async def test_a_validator_that_missed_one_precommit_decides_with_the_precommits_alone(
        tmp_path: Path) -> None:
    """B loses A's first precommit: A decides, B stays behind, and A's answer to its
    votes of that height is the commit's precommits, not the whole block."""
    a, b = PAIR_IDS
    lost: list[int] = []

    def lose_once(sender: str, receiver: str, message: dict[str, Any]) -> bool:
        if (sender, receiver) == (a, b) and message["kind"] == "vote" \
                and message["type"] == 2 and not lost:
            lost.append(message["height"])
            return True
        return False

    chains = await _pair(tmp_path, lose_once, fetch=False)
    committed = await _submit_until_b_decides(chains)
    assert lost == [committed.block.height]
    assert chains[1].last_block is not None and chains[1].last_block.id == committed.block.id
    links = chains[0].transport
    assert isinstance(links, InProcessLinks)
    assert links.delivered.count((b, "decided")) == 0


async def test_votes_are_relayed_to_the_others_never_back_to_their_validator(
        tmp_path: Path) -> None:
    """Four validators; A's votes never reach C directly, so C sees them only as the
    others' relays (which catch a validator sending different votes to different
    peers). Nobody is sent its own vote back."""
    keys = [Ed25519PrivateKey.from_private_bytes(bytes([i + 40]) * 32) for i in range(4)]
    ids = [Validator(k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).id
           for k in keys]
    a, c = ids[0], ids[2]

    def lose(sender: str, receiver: str, message: dict[str, Any]) -> bool:
        return (sender, receiver) == (a, c) and message["kind"] == "vote"

    chains = await _cluster(tmp_path, keys, lose)
    try:
        for _ in range(3):
            await chains[1].submit(os.urandom(200), timeout=20)
        await asyncio.sleep(0.3)  # relays wait at most RELAY_DELAY for other traffic
    finally:
        for chain in chains:
            await chain.stop()
    delivered = {me: chain.transport for me, chain in zip(ids, chains, strict=True)}
    relayed_to_c = 0
    for sender, links in delivered.items():
        assert isinstance(links, InProcessLinks)
        assert all(receiver != validator for receiver, validator in links.votes)
        relayed_to_c += sum(1 for receiver, validator in links.votes
                            if (receiver, validator) == (c, a) and sender != a)
    assert relayed_to_c >= 2  # A's prevote and precommit of at least one height
