"""Consensus: the Tendermint driver over STOQ, sealed decisions, epoch beacons, stake, proofs.

The four proofs (space, stake, work, time) and their binding are specified in
spec/stoq.md §17; :mod:`protocol.ops.consensus` has the wire format shared
with the client library. What the decisions mean is the replicated CA's
(:mod:`handlers.replica`).
"""

from ._beacon import BeaconChain, ChainBeacons
from ._chain_service import ChainService
from ._checkpoints import CheckpointSubmitter
from ._driver import (
    Committed,
    ConsensusChain,
    Executed,
    OpenRules,
    PeerLinks,
    Rules,
)
from ._links import LinkVerifier, link_refusal, link_statement, spki_sha256
from ._sealed import (
    Group,
    SealedDecision,
    SealError,
    SealOpener,
    open_sealed,
    seal,
    seal_batch,
    unseal,
)
from ._sealer import Sealer
from ._stake import ChainFaucet, Faucet
from ._verifier import ProofVerifier, VerifierStats
from .service import ConsensusService

__all__ = [
    "BeaconChain",
    "ChainBeacons",
    "ChainFaucet",
    "ChainService",
    "CheckpointSubmitter",
    "Committed",
    "ConsensusChain",
    "ConsensusService",
    "Executed",
    "Faucet",
    "Group",
    "LinkVerifier",
    "OpenRules",
    "PeerLinks",
    "ProofVerifier",
    "Rules",
    "SealError",
    "SealOpener",
    "SealedDecision",
    "Sealer",
    "VerifierStats",
    "link_refusal",
    "link_statement",
    "open_sealed",
    "seal",
    "seal_batch",
    "spki_sha256",
    "unseal",
]
