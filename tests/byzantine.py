"""A byzantine validator: a real ``trustchain serve`` whose consensus equivocates.

``python -m tests.byzantine --config FILE`` runs the node exactly as
``trustchain serve`` does, except that every proposal and vote it signs is
split: one half of its peers gets the honest message, the other half a
conflicting one, signed with the same key for the same height, round and type
(a vote for another block id, or a proposal of a block with another time).
This is the twins-style equivocation of the reference's 33 % case; it bypasses
the core's signing guard on purpose. Each equivocation is printed as a JSON
line (``{"equivocated": kind, "height", "round", "at_ms"}``) on stderr so that
tests and benchmarks can time detection.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

from handlers.consensus import ConsensusChain
from handlers.consensus.bft import Proposal, Vote, encode_message
from handlers.consensus.bft._core import Broadcast, Effect


def _conflicting(chain: ConsensusChain, message: Proposal | Vote) -> Proposal | Vote:
    assert chain.sign is not None
    if isinstance(message, Vote):
        other = os.urandom(32) if message.block_id is None else None
        return dataclasses.replace(message, block_id=other).signed(chain.chain_id, chain.sign)
    block = dataclasses.replace(message.block, time_ms=message.block.time_ms + 1)
    return dataclasses.replace(message, block=block).signed(chain.chain_id, chain.sign)


def install() -> None:
    """Make every :class:`ConsensusChain` of this process equivocate."""
    honest_perform = ConsensusChain._perform

    async def perform(self: ConsensusChain, effects: list[Effect]) -> None:
        kept: list[Effect] = []
        for effect in effects:
            message = effect.message if isinstance(effect, Broadcast) else None
            own = (isinstance(message, Vote) and message.validator == self.me) or (
                isinstance(message, Proposal) and message.proposer == self.me)
            if message is None or not own or not self.peers:
                kept.append(effect)
                continue
            assert isinstance(message, Proposal | Vote)
            await honest_perform(self, kept)
            kept = []
            await self._flush_state()
            twin = _conflicting(self, message)
            peers = sorted(self.peers)
            for i, peer_id in enumerate(peers):
                chosen = message if i % 2 == 0 else twin
                self._enqueue(self.peers[peer_id], encode_message(chosen))
            print(json.dumps({"equivocated": type(message).__name__.lower(),
                              "height": message.height, "round": message.round,
                              "at_ms": int(time.time() * 1000)}), file=sys.stderr, flush=True)
        await honest_perform(self, kept)

    ConsensusChain._perform = perform  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(prog="python -m tests.byzantine")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    install()
    from trustchain._cli import main as trustchain_main
    return trustchain_main(["serve", "--config", args.config])


if __name__ == "__main__":
    sys.exit(main())
