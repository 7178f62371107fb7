"""``consensus.gossip``, ``consensus.identity``, ``consensus.blocks`` and
``consensus.status``: a validator's ops."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from protocol import ConsensusRejected, InvalidRequest, NotFound, Unauthorized, decode_item
from protocol.ops import consensus as ops

from .._router import RequestContext, Router
from ._cosign import validate_ct_log_consensus
from ._driver import ConsensusChain
from ._links import LinkVerifier, link_statement
from .bft import Block, Commit


class ChainService:
    """Serves one :class:`ConsensusChain` to the other validators and to operators.

    :param checkpoints: CT origin -> (size, block height, decision index) of the
        latest committed checkpoint (the application's).
    :param state_status: what ``consensus.status`` reports of the application's state.
    :param links: checks that gossip comes from a validator over a link it bound.
    :param tls_keys: SPKI hashes of the TLS keys this node served with, newest first.
    """

    def __init__(self, chain: ConsensusChain,
                 checkpoints: dict[str, tuple[int, int, int]] | None = None, *,
                 links: LinkVerifier, tls_keys: Callable[[], list[bytes]],
                 state_status: Callable[[], dict[str, Any]] = dict) -> None:
        self.chain = chain
        self.checkpoints = checkpoints if checkpoints is not None else {}
        self.links = links
        self.tls_keys = tls_keys
        self.state_status = state_status
        self._statements: dict[bytes, bytes] = {}

    def checkpoint(self, args: ops.CheckpointArgs, ctx: RequestContext) -> dict[str, Any]:
        """``validate_ct_log_consensus`` of the latest committed checkpoint of each origin."""
        origins = sorted(self.checkpoints) if args.origin is None else [args.origin]
        found = []
        for origin in origins:
            where = self.checkpoints.get(origin)
            if where is None:
                raise NotFound(f"no checkpoint of {origin!r} is committed", field="origin")
            _, height, index = where
            stored = self.chain.store.block(height)
            assert stored is not None
            cosigned = validate_ct_log_consensus(
                Block.from_wire(decode_item(stored.block)),
                Commit.from_wire(decode_item(stored.commit)), index,
                chain_id=self.chain.chain_id, validators=self.chain.core.validators)
            found.append({"origin": cosigned.origin, "size": cosigned.size,
                          "root": cosigned.root, "block_height": cosigned.block_height,
                          "checkpoint": cosigned.note, "cosigners": list(cosigned.cosigners)})
        return {"checkpoints": found}

    async def gossip(self, args: ops.GossipArgs, ctx: RequestContext) -> dict[str, Any]:
        """Messages from another validator, over a link it bound to this endpoint."""
        refusal = self.links.refusal(args.sender, args.link, self.tls_keys)
        if refusal is not None:
            raise Unauthorized(f"not a validator link: {refusal}", field="link")
        if self.chain.failure is not None:
            raise ConsensusRejected("this validator's consensus has stopped")
        messages = list(args.messages)
        if args.packed is not None:
            if messages:
                raise InvalidRequest("a gossip request carries messages or packed, not both",
                                     field="packed")
            messages = ops.unpack_messages(args.packed, self.chain.max_message_bytes)
        accepted = await self.chain.receive(messages, args.sender)
        return {"accepted": accepted, "height": self.chain.core.height}

    def identity(self, args: ops.IdentityArgs, ctx: RequestContext) -> dict[str, Any]:
        """This endpoint's validator and its signed statement over the TLS key it serves."""
        chain = self.chain
        if chain.me is None or chain.sign is None:
            raise NotFound("this node follows the chain without being a validator")
        tls_key = self.tls_keys()[0]
        statement = self._statements.get(tls_key)
        if statement is None:
            statement = chain.sign(link_statement(chain.chain_id, chain.me, tls_key))
            self._statements = {tls_key: statement}
        return {"validator": chain.me, "tls_key": tls_key, "link": statement}

    def blocks(self, args: ops.BlocksArgs, ctx: RequestContext) -> dict[str, Any]:
        latest = self.chain.last_block.height if self.chain.last_block else 0
        if args.start > latest + 1:
            raise NotFound(f"no block at height {args.start} (the latest is {latest})",
                           field="start")
        return {"blocks": [{"block": b.block, "commit": b.commit}
                           for b in self.chain.blocks(args.start, args.limit)],
                "latest": latest}

    def validators(self, args: ops.ValidatorsArgs, ctx: RequestContext) -> dict[str, Any]:
        """The set whose precommits commit a block at ``height``: what a client needs to
        check a commit by itself (spec §18.14)."""
        chain = self.chain
        height = chain.core.height if args.height is None else args.height
        validators = chain.validators_at(height)
        if validators is None:
            raise NotFound(f"no validator set recorded for height {height} (this node is "
                           f"at height {chain.core.height})", field="height")
        total = validators.total_power
        return {"chain_id": chain.chain_id, "height": height, "total_power": total,
                "quorum_power": total * 2 // 3 + 1,
                "validators": [{"id": v.id, "public_key": v.public_key, "power": v.power,
                                "address": v.address, "port": v.port}
                               for v in validators.validators]}

    def status(self, args: ops.StatusArgs, ctx: RequestContext) -> dict[str, Any]:
        return {**self.chain.status(), **self.state_status()}

    def register(self, router: Router) -> None:
        router.add(ops.GOSSIP, self.gossip)
        router.add(ops.IDENTITY, self.identity)
        router.add(ops.BLOCKS, self.blocks)
        router.add(ops.STATUS, self.status)
        router.add(ops.CHECKPOINT, self.checkpoint)
        router.add(ops.VALIDATORS, self.validators)
