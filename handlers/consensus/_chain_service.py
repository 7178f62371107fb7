"""``consensus.gossip``, ``consensus.blocks`` and ``consensus.status``: a validator's ops."""

from __future__ import annotations

from typing import Any

from cryptography import x509

from protocol import ConsensusRejected, InvalidRequest, NotFound, decode_item
from protocol.ops import consensus as ops

from .._router import RequestContext, Router
from ._cosign import validate_ct_log_consensus
from ._decisions import matches_decision
from ._driver import ConsensusChain
from .bft import Block, Commit


class ChainService:
    """Serves one :class:`ConsensusChain` to the other validators and to operators.

    :param checkpoints: CT origin -> (size, block height, decision index) of the
        latest committed checkpoint (:attr:`._decisions.CaRules.checkpoints`).
    """

    def __init__(self, chain: ConsensusChain,
                 checkpoints: dict[str, tuple[int, int, int]] | None = None, *,
                 validity: float = 86400.0, backdate: float = 300.0) -> None:
        self.chain = chain
        self.checkpoints = checkpoints if checkpoints is not None else {}
        self.validity = validity
        self.backdate = backdate

    def check_certificate(self, args: ops.CheckCertificateArgs,
                          ctx: RequestContext) -> dict[str, Any]:
        """Find the committed issuance a certificate must come from (spec §18.6).

        The block is found by the certificate's start of validity (the block time
        minus the back-dating); a certificate that matches no committed decision
        was signed without consensus, and is recorded as misbehaviour.
        """
        try:
            cert = x509.load_der_x509_certificate(args.certificate)
        except ValueError:
            raise InvalidRequest("certificate is not a DER X.509 certificate",
                                 field="certificate") from None
        start_ms = (int(cert.not_valid_before_utc.timestamp()) + int(self.backdate)) * 1000
        for stored in self.chain.store.blocks_between(start_ms, start_ms + 1000):
            block = Block.from_wire(decode_item(stored.block))
            for index in range(len(block.decisions)):
                if matches_decision(cert, block, index, validity=self.validity,
                                    backdate=self.backdate) is None:
                    return {"committed": True, "block_height": block.height, "index": index,
                            "block_hash": block.id, "reason": None}
        reason = ("no committed block fixed this certificate's serial number, validity and "
                  "key: it was signed without consensus")
        self.chain.misbehaved(None, f"certificate {format(cert.serial_number, 'x')} issued by "
                                    f"{cert.issuer.rfc4514_string()}: {reason}")
        return {"committed": False, "block_height": None, "index": None, "block_hash": None,
                "reason": reason}

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
        """Messages from another validator; each is signed, so the sender is only a hint."""
        if self.chain.failure is not None:
            raise ConsensusRejected("this validator's consensus has stopped")
        accepted = await self.chain.receive(list(args.messages), args.sender)
        return {"accepted": accepted, "height": self.chain.core.height}

    def blocks(self, args: ops.BlocksArgs, ctx: RequestContext) -> dict[str, Any]:
        latest = self.chain.last_block.height if self.chain.last_block else 0
        if args.start > latest + 1:
            raise NotFound(f"no block at height {args.start} (the latest is {latest})",
                           field="start")
        return {"blocks": [{"block": b.block, "commit": b.commit}
                           for b in self.chain.blocks(args.start, args.limit)],
                "latest": latest}

    def status(self, args: ops.StatusArgs, ctx: RequestContext) -> dict[str, Any]:
        return self.chain.status()

    def register(self, router: Router) -> None:
        router.add(ops.GOSSIP, self.gossip)
        router.add(ops.BLOCKS, self.blocks)
        router.add(ops.STATUS, self.status)
        router.add(ops.CHECKPOINT, self.checkpoint)
        router.add(ops.CHECK_CERTIFICATE, self.check_certificate)
