"""Wiring of the validator chain: every CA decision is committed by consensus first.

``attach(node)`` loads (or creates) the node's Ed25519 validator key, builds
the validator set from ``[[consensus.validators]]`` (empty: this node alone,
n = 1), opens ``DATA/consensus/chain.sqlite3``, links to the other validators
over STOQ, serves ``consensus.gossip``, ``consensus.blocks`` and
``consensus.status``, and puts :class:`handlers.consensus.ConsensusAdmission`
in front of the four-proof admission, so that ``ca.issue`` and ``ca.revoke``
take effect only once a block commits them. The chain is
``node.services["chain"]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from cryptography.hazmat.primitives import serialization

from handlers.ca._policy import check_request
from handlers.consensus import (
    CaRules,
    ChainBeacons,
    ChainService,
    ConsensusAdmission,
    ConsensusChain,
    FourProofAdmission,
)
from handlers.consensus._decisions import seal
from handlers.consensus.bft import Validator, ValidatorSet, validator_id
from handlers.consensus.bft._core import Timeouts
from store import ChainStore

from ._peers import StoqTransport

log = logging.getLogger("trustchain.consensus")


async def _submit_checkpoints(chain: ConsensusChain, ct_log: Any, own_id: str,
                              sign: Any, interval: float) -> None:
    """Put each CT shard's new checkpoint before the validators, every ``interval`` s.

    Committed, it carries a cosignature of every precommitting validator
    (``consensus.checkpoint``).
    """
    submitted: dict[str, int] = {}
    while True:
        await asyncio.sleep(interval)
        for shard in list(ct_log.shards):
            checkpoint = shard.checkpoint
            if checkpoint.size == 0 or submitted.get(shard.origin) == checkpoint.size:
                continue
            body = {"kind": "checkpoint", "origin": shard.origin, "size": checkpoint.size,
                    "root": checkpoint.root, "note": checkpoint.note,
                    "at_ms": int(chain.clock() * 1000)}
            try:
                await chain.submit(seal(body, own_id, sign), checked=False, timeout=60)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("CT checkpoint not committed: %s", exc)
                continue
            submitted[shard.origin] = checkpoint.size


def validator_set(cfg: Any, own_key: bytes) -> tuple[ValidatorSet, dict[str, str]]:
    """The configured validators (or this node alone) and their names."""
    configured = cfg.consensus.validators
    if not configured:
        me = Validator(own_key, 1, "::1", 0)
        return ValidatorSet((me,)), {me.id: "self"}
    validators = tuple(Validator(bytes.fromhex(v.public_key), v.power, v.address, v.port)
                       for v in configured)
    names = {v.id: c.name or v.id[:8] for v, c in zip(validators, configured, strict=True)}
    return ValidatorSet(validators), names


async def attach(node: Any) -> None:
    assert node.ca is not None and node.audit is not None
    cfg = node.cfg
    consensus = cfg.consensus
    audit = node.audit.append_async
    signer = node.keystore.get(consensus.validator_key)
    if signer is None:
        signer = node.keystore.create(consensus.validator_key, "ed25519")
        await audit("key.generated", {"name": consensus.validator_key,
                                      "algorithm": signer.algorithm,
                                      "keystore": node.keystore.kind})
    if signer.algorithm != "ed25519":
        raise ValueError(f"the validator key {consensus.validator_key!r} must be Ed25519")
    own_key = signer.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    validators, names = validator_set(cfg, own_key)
    own_id = validator_id(own_key)
    me: str | None = own_id
    if own_id not in validators.by_id:
        log.warning("this node's validator key is not in consensus.validators: it follows "
                    "the chain without voting", extra={"validator": own_id})
        me = None
    proofs = node.services["proofs"]
    store = ChainStore(node.data_dir / "consensus" / "chain.sqlite3")
    transport = StoqTransport(me=me, endpoints={v.id: (v.address, v.port)
                                                for v in validators.validators},
                              engine=cfg.network.quic_engine)
    beacons = proofs.beacons
    chain_holder: list[ConsensusChain] = []

    async def on_block(block: Any) -> None:
        if isinstance(beacons, ChainBeacons):
            await beacons.on_block(block.time_ms, block.id)

    policy = node.ca.policy
    rules = CaRules(check_csr=lambda csr: check_request(csr, policy),
                    verify_proofs=proofs.verifier.verify, set_stake=proofs.set_stake,
                    validators=lambda: chain_holder[0].core.validators,
                    development=node.development, minimum_stake=proofs.params.minimum_stake,
                    on_block=on_block, cosign=signer.sign if me else None)
    chain = ConsensusChain(
        chain_id=consensus.chain_id, validators=validators, store=store, transport=transport,
        rules=rules, me=me, sign=signer.sign if me else None,
        timeouts=Timeouts(propose=consensus.block_interval + consensus.timeout_propose,
                          prevote=consensus.timeout_prevote,
                          precommit=consensus.timeout_precommit,
                          delta=consensus.timeout_delta),
        block_interval=consensus.block_interval, gossip_interval=consensus.gossip_interval,
        max_block_decisions=consensus.max_block_decisions,
        max_frame_size=cfg.network.max_frame_size, names=names, audit=audit)
    chain_holder.append(chain)
    ChainService(chain, rules.checkpoints, validity=cfg.ca.cert_validity_days * 86400.0,
                 backdate=cfg.ca.backdate).register(node.router)
    local = node.ca.admission
    if not isinstance(local, FourProofAdmission):
        raise RuntimeError("the chain wiring runs after the four-proof wiring")
    if me is not None:
        node.ca.admission = ConsensusAdmission(local=local, chain=chain, entry=me,
                                               sign=signer.sign,
                                               timeout=consensus.finality_timeout)

        async def submit_stake(key_id: str, amount: int) -> None:
            body = {"kind": "stake", "key_id": key_id, "amount": amount, "reason": "faucet",
                    "at_ms": int(chain.clock() * 1000)}
            await chain.submit(seal(body, own_id, signer.sign), checked=False,
                               timeout=consensus.finality_timeout)

        proofs.submit_stake = submit_stake
    node.services["chain"] = chain
    node.health_checks["consensus"] = lambda: chain.started and chain.failure is None
    tasks: list[asyncio.Task[None]] = []
    ct = node.services.get("ct")
    if me is not None and ct is not None:
        tasks.append(asyncio.get_running_loop().create_task(
            _submit_checkpoints(chain, ct.log, own_id, signer.sign,
                                max(1.0, cfg.ct.merkle_update_interval))))

    async def stop() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await chain.stop()
        await transport.close()
        store.close()

    node.on_stop.append(stop)
    await chain.start()
