"""Consensus services: epoch beacons, the stake ledger and four-proof admission.

The four proofs (space, stake, work, time) and their binding are specified in
spec/stoq.md §17; :mod:`protocol.ops.consensus` has the wire format shared
with the client library.
"""

from ._admission import ConsensusAdmission, FourProofAdmission
from ._beacon import BeaconChain, ChainBeacons
from ._chain import Committed, ConsensusChain, OpenRules, Rules, Transport
from ._chain_service import ChainService
from ._decisions import CaRules, derive_serial, matches_decision
from ._proofs import ProofVerifier, VerifierStats
from .service import ConsensusService

__all__ = [
    "BeaconChain",
    "CaRules",
    "ChainBeacons",
    "ChainService",
    "Committed",
    "ConsensusAdmission",
    "ConsensusChain",
    "ConsensusService",
    "FourProofAdmission",
    "OpenRules",
    "ProofVerifier",
    "Rules",
    "Transport",
    "VerifierStats",
    "derive_serial",
    "matches_decision",
]
