"""The replicated CA: what every validator executes, and how a validator takes part.

Committed blocks are the only way the CA's state changes. :mod:`protocol.decisions`
names what a block can carry, :mod:`._rules` checks each decision before a
validator votes, :mod:`._machine` executes committed blocks identically on
every validator (the certificate registry, revocations, name ownership, stake,
DNS registrations, the CT log, fingerprints) and keeps the state hash each
block carries; :mod:`.service` is this validator's side: its decisions, its
announced keys, ``consensus.check-certificate``.
"""

from protocol.decisions import (
    Checkpoint,
    CompactCertificate,
    Decision,
    DecisionError,
    Issue,
    LogChain,
    Misissued,
    NodeCertificate,
    Register,
    Revoke,
    SignedCertificate,
    StakeCredit,
    ValidatorKeys,
    parse,
)

from ._directory import Announced, Intermediate, ValidatorDirectory, parse_announced
from ._machine import CaStateMachine, Outcome, refused
from ._rules import CaRules
from .service import DecisionLog, KeysAnnouncer, ReplicaService, raise_refused

__all__ = [
    "Announced",
    "CaRules",
    "CaStateMachine",
    "Checkpoint",
    "CompactCertificate",
    "Decision",
    "DecisionError",
    "DecisionLog",
    "Intermediate",
    "Issue",
    "KeysAnnouncer",
    "LogChain",
    "Misissued",
    "NodeCertificate",
    "Outcome",
    "Register",
    "ReplicaService",
    "Revoke",
    "SignedCertificate",
    "StakeCredit",
    "ValidatorDirectory",
    "ValidatorKeys",
    "parse",
    "parse_announced",
    "raise_refused",
    "refused",
]
