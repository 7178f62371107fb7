"""The consensus driver with one validator (n = 1): decisions commit in blocks that fit
a frame, the chain survives a restart, and a resubmitted decision is not committed twice."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from handlers.consensus import ConsensusChain, OpenRules
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


def _chain(path: Path, **kwargs: object) -> ConsensusChain:
    return ConsensusChain(chain_id="unit", validators=ValidatorSet((ME,)),
                          store=ChainStore(path / "chain.sqlite3"), transport=NoPeers(),
                          rules=OpenRules(), me=ME.id, sign=KEY.sign,
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
