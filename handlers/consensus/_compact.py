"""Compact proposals: a proposal names its decisions by digest instead of carrying them.

Every decision reaches every validator on its own first (``decision-batch``
gossip, checked into the mempool), so a proposal that carries the decisions
again sends each of them a second time to every validator. A compact
proposal is the signed proposal with an empty ``decisions`` list plus the
SHA-256 digests of its decisions in order; the receiver puts the block back
together from its mempool, and the proposal's signature (over the whole
block's id) is checked on the rebuilt block as on any other. A receiver
that misses a decision (refused it, never got it, or its mempool was full)
asks the sender for the whole proposal (``want-proposal``) and the sender
sends it as before. Nothing here trusts the sender: a wrong digest list
just rebuilds a block whose id the signature does not cover.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from protocol import encode_deterministic

from .bft import BadMessage, Proposal
from .bft._types import MAX_DECISIONS, MAX_ROUND

COMPACT_KIND = "compact-proposal"
WANT_KIND = "want-proposal"
DIGEST_SIZE = 32


def compact_proposal(proposal: Proposal, digests: list[bytes]) -> bytes:
    """``proposal`` as deterministic CBOR, its decisions replaced by ``digests``."""
    wire = proposal.to_wire()
    wire["block"] = dict(wire["block"], decisions=[])
    return encode_deterministic({"kind": COMPACT_KIND, "proposal": wire, "digests": digests})


def want_proposal(height: int, round: int) -> bytes:
    """The request for a whole proposal that could not be rebuilt."""
    return encode_deterministic({"kind": WANT_KIND, "height": height, "round": round})


def rebuild_proposal(item: dict[str, Any], lookup: Callable[[bytes], bytes | None]
                     ) -> Proposal | tuple[int, int]:
    """The proposal a ``compact-proposal`` item stands for, its decisions found with
    ``lookup`` (digest -> sealed decision); ``(height, round)`` if one is missing.

    :raises BadMessage: not a well-formed compact proposal.
    """
    wire, digests = item.get("proposal"), item.get("digests")
    if not (isinstance(wire, dict) and isinstance(digests, list)
            and len(digests) <= MAX_DECISIONS
            and all(isinstance(d, bytes) and len(d) == DIGEST_SIZE for d in digests)):
        raise BadMessage("compact-proposal: proposal map and digests of 32 bytes expected")
    block = wire.get("block")
    if not isinstance(block, dict) or block.get("decisions") != []:
        raise BadMessage("compact-proposal: the block's decisions must be empty")
    height, round = _height_round(wire, COMPACT_KIND)
    decisions = []
    for digest in digests:
        decision = lookup(digest)
        if decision is None:
            return height, round
        decisions.append(decision)
    proposal = Proposal.from_wire(dict(wire, block=dict(block, decisions=decisions)))
    proposal.block.knowing_digests(digests)  # the mempool's keys: not hashed again
    return proposal


def parse_want(item: dict[str, Any]) -> tuple[int, int]:
    """``(height, round)`` of a ``want-proposal`` item.

    :raises BadMessage: not one.
    """
    return _height_round(item, WANT_KIND)


def _height_round(item: dict[str, Any], kind: str) -> tuple[int, int]:
    height, round = item.get("height"), item.get("round")
    if not (type(height) is int and type(round) is int
            and height >= 1 and 0 <= round <= MAX_ROUND):
        raise BadMessage(f"{kind}: height and round expected")
    return height, round
