"""Consensus services: epoch beacons, the stake ledger and four-proof admission.

The four proofs (space, stake, work, time) and their binding are specified in
spec/stoq.md §17; :mod:`protocol.ops.consensus` has the wire format shared
with the client library.
"""

from ._admission import FourProofAdmission
from ._beacon import BeaconChain
from ._proofs import ProofVerifier, VerifierStats
from .service import ConsensusService

__all__ = [
    "BeaconChain",
    "ConsensusService",
    "FourProofAdmission",
    "ProofVerifier",
    "VerifierStats",
]
