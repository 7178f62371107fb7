"""Wiring of four-proof admission: stake ledger, epoch beacons, verifier, ``consensus.*`` ops.

``attach(node)`` opens ``DATA/consensus/ledger.sqlite3``, credits the genesis
stake, makes the current epoch's beacon with the keystore's ``beacon`` key,
serves ``consensus.beacon``, ``consensus.stake`` and ``consensus.faucet``
(development only), and replaces the CA's local admission with
:class:`handlers.consensus.FourProofAdmission`, so that every ``ca.issue`` and
``ca.revoke`` needs the four proofs. The service is ``node.services["proofs"]``.
"""

from __future__ import annotations

from typing import Any

from handlers.consensus import (
    BeaconChain,
    ChainBeacons,
    ConsensusService,
    FourProofAdmission,
    ProofVerifier,
)
from protocol.ops.consensus import ProofParams
from store import LedgerStore

BEACON_KEY = "beacon"
"""Keystore name of the key that signs the epoch beacons."""


def proof_params(cfg: Any) -> ProofParams:
    """The proof parameters ``cfg`` (a :class:`trustchain._config.Config`) asks for."""
    consensus = cfg.consensus
    mode = cfg.ca.mode
    return ProofParams(minimum_stake=consensus.minimum_stake,
                       minimum_work_difficulty=consensus.minimum_work_difficulty,
                       plot_size=consensus.resolved_plot_size(mode),
                       vdf_iterations=consensus.resolved_vdf_iterations(mode),
                       epoch_length=int(consensus.epoch_length))


async def attach(node: Any) -> None:
    assert node.audit is not None and node.ca is not None
    cfg = node.cfg
    audit = node.audit.append_async
    params = proof_params(cfg)
    signer = node.keystore.get(BEACON_KEY)
    if signer is None:
        signer = node.keystore.create(BEACON_KEY, "ecdsa-p256-sha256")
        await audit("key.generated", {"name": BEACON_KEY, "algorithm": signer.algorithm,
                                      "keystore": node.keystore.kind})
    ledger = LedgerStore(node.data_dir / "consensus" / "ledger.sqlite3")
    beacons: BeaconChain
    if len(cfg.consensus.validators) > 1:
        # a cluster: the beacon comes from the committed chain (see _wiring_chain)
        def first_block_at(time_ms: int) -> tuple[int, bytes] | None:
            chain = node.services.get("chain")
            stored = chain.store.first_at_or_after(time_ms) if chain is not None else None
            return None if stored is None else (stored.time_ms, stored.id)

        beacons = ChainBeacons(first_block_at=first_block_at, ledger=ledger, signer=signer,
                               epoch_length=params.epoch_length, audit=audit)
    else:
        beacons = BeaconChain(ledger=ledger, signer=signer, epoch_length=params.epoch_length,
                              audit=audit)
    verifier = ProofVerifier(params=params, ledger=ledger, beacons=beacons,
                             workers=cfg.consensus.verify_workers)
    service = ConsensusService(ledger=ledger, beacons=beacons, verifier=verifier,
                               params=params, development=node.development, audit=audit)
    node.on_stop.append(service.stop)
    await service.apply_genesis(dict(cfg.consensus.genesis))
    if not isinstance(beacons, ChainBeacons):
        await beacons.current()
    service.register(node.router)
    node.ca.admission = FourProofAdmission(verifier=verifier, audit=audit)
    node.services["proofs"] = service
    service.start()
    if not node.development:
        # a production node starts its VDF worker now, so that the first requester of
        # an epoch does not wait for a process to start (development: at first use)
        await verifier.warm_up()
