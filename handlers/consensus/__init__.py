"""Consensus services: epoch beacons, the stake ledger and four-proof admission.

The four proofs (space, stake, work, time) and their binding are specified in
spec/stoq.md §17; :mod:`protocol.ops.consensus` has the wire format shared
with the client library.
"""

from ._admission import ConsensusAdmission, FourProofAdmission
from ._beacon import BeaconChain, ChainBeacons
from ._chain_service import ChainService
from ._checkpoints import CheckpointSubmitter
from ._decisions import CaRules, derive_serial, matches_decision
from ._driver import Committed, ConsensusChain, OpenRules, PeerLinks, Rules
from ._stake import ChainFaucet, Faucet, LedgerFaucet, StakeLedger
from ._verifier import ProofVerifier, VerifierStats
from .service import ConsensusService

__all__ = [
    "BeaconChain",
    "CaRules",
    "ChainBeacons",
    "ChainFaucet",
    "ChainService",
    "CheckpointSubmitter",
    "Committed",
    "ConsensusAdmission",
    "ConsensusChain",
    "ConsensusService",
    "Faucet",
    "FourProofAdmission",
    "LedgerFaucet",
    "OpenRules",
    "PeerLinks",
    "ProofVerifier",
    "Rules",
    "StakeLedger",
    "VerifierStats",
    "derive_serial",
    "matches_decision",
]
