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

With ``--forge proof-free`` it is honest in its votes instead, and tries the
other shortcut a byzantine validator has: every 2 s (at most 10 times) it
seals an ``issue`` decision without proofs for ``forged.trust`` and puts it in
its own mempool unchecked, so that it gossips it and proposes blocks holding
it. Each attempt is printed as ``{"forged": "proof-free", "digest"}``.

With ``--forge bad-seal`` it tries batch seals that must not open, every 2 s (at
most 10 times), alternately: ``forged-path``, a body of its own with the path of
a batch it sealed without that body; and ``foreign-root``, a body of its own with
the entry, signature (and batch, if any) of another validator's committed
decision. Each is gossiped as its own; printed as ``{"forged": "bad-seal",
"variant", "digest"}``. With each it also sends every peer a ``decision-group``
(spec §18.3) whose signature is of the same bodies in another order
(``{"forged": "bad-seal", "variant": "forged-group"}``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

import stoq
from handlers.consensus import ConsensusChain, Group, seal, seal_batch
from handlers.consensus._driver import decision_digest
from handlers.consensus.bft import Block, Proposal, Vote, encode_message
from handlers.consensus.bft._core import Broadcast, Effect
from protocol import decode_item, encode_deterministic


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


FORGE_ATTEMPTS = 10


async def _forge(chain: ConsensusChain) -> None:
    assert chain.me is not None and chain.sign is not None
    csr = stoq.build_csr(ec.generate_private_key(ec.SECP256R1()), ["forged.trust"], [])
    for _ in range(FORGE_ATTEMPTS):
        await asyncio.sleep(2.0)
        body = {"kind": "issue", "csr": csr, "proofs": None, "precertificate": b"",
                "renews": None, "renewal_signature": None, "at_ms": int(time.time() * 1000)}
        decision = seal(body, chain.me, chain.sign)
        print(json.dumps({"forged": "proof-free",
                          "digest": decision_digest(decision).hex()}), file=sys.stderr,
              flush=True)
        try:
            await chain.submit(decision, checked=True, timeout=2.0)
        except Exception as exc:  # never committed: what the honest ones should achieve
            print(json.dumps({"forged": "not committed", "why": str(exc)[:200]}),
                  file=sys.stderr, flush=True)


def _foreign_decision(chain: ConsensusChain) -> dict[str, Any] | None:
    """A committed decision another validator sealed (the latest one), decoded."""
    latest = chain.store.latest()
    height = 0 if latest is None else latest.height
    for h in range(height, max(0, height - 2000), -1):
        stored = chain.store.block(h)
        if stored is None:
            continue
        for raw in Block.from_wire(decode_item(stored.block)).decisions:
            item = decode_item(raw)
            if item["entry"] != chain.me:
                return dict(item)
    return None


async def _forge_seals(chain: ConsensusChain) -> None:
    assert chain.me is not None and chain.sign is not None
    for attempt in range(FORGE_ATTEMPTS):
        await asyncio.sleep(2.0)
        now = int(time.time() * 1000)
        bodies = [encode_deterministic({"kind": "stake", "key_id": f"forged-{attempt}-{i}",
                                        "amount": 1, "reason": "faucet", "at_ms": now})
                  for i in range(3)]
        foreign = _foreign_decision(chain) if attempt % 2 else None
        if foreign is None:
            variant = "forged-path"
            item = decode_item(seal_batch(bodies[:2], chain.me, chain.sign)[0])
            item["body"] = bodies[2]
        else:
            variant = "foreign-root"
            item = {**foreign, "body": bodies[2]}
            item.setdefault("batch", {"index": 0, "size": 2,
                                      "path": [hashlib.sha256(bodies[0]).digest()]})
        decision = encode_deterministic(item)
        print(json.dumps({"forged": "bad-seal", "variant": variant,
                          "digest": decision_digest(decision).hex()}), file=sys.stderr,
              flush=True)
        other_order = decode_item(seal_batch(bodies[1::-1], chain.me, chain.sign)[0])
        group = Group(entry=chain.me, signature=other_order["signature"],
                      bodies=tuple(bodies[:2]))
        for peer in chain.peers.values():
            chain._enqueue(peer, group.message())
        print(json.dumps({"forged": "bad-seal", "variant": "forged-group"}),
              file=sys.stderr, flush=True)
        try:
            await chain.submit(decision, checked=True, timeout=2.0)
        except Exception as exc:
            print(json.dumps({"forged": "not committed", "why": str(exc)[:200]}),
                  file=sys.stderr, flush=True)


def install_forger(forge: str) -> None:
    """Make every :class:`ConsensusChain` of this process forge decisions: proof-free
    issuances (``proof-free``) or seals (``bad-seal``)."""
    honest_start = ConsensusChain.start
    tasks: list[asyncio.Task[None]] = []
    forger = _forge_seals if forge == "bad-seal" else _forge

    async def start(self: ConsensusChain) -> None:
        await honest_start(self)
        if self.me is not None:
            tasks.append(asyncio.get_running_loop().create_task(forger(self)))

    ConsensusChain.start = start  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(prog="python -m tests.byzantine")
    parser.add_argument("--config", required=True)
    parser.add_argument("--forge", choices=["proof-free", "bad-seal"], default=None,
                        help="forge decisions (proof-free issuances, or seals that must "
                             "not open) instead of equivocating")
    args = parser.parse_args(argv)
    if args.forge:
        install_forger(args.forge)
    else:
        install()
    from trustchain._cli import main as trustchain_main
    return trustchain_main(["serve", "--config", args.config])


if __name__ == "__main__":
    sys.exit(main())
