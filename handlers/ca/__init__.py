"""The certificate authority: hierarchy, policy, admission, issuance, revocation, rotation."""

from protocol import renewal_statement, revocation_statement

from ._admission import Admission, Admitted, Decision, LocalAdmission
from ._authority import ROOT_KEY, Hierarchy, HierarchyConfig, Issuer
from ._policy import CheckedRequest, NamingPolicy, check_request
from ._rotation import Rotator, node_csr
from ._signing import KeystoreSettings, SigningWorkers
from .service import CertificateAuthority

__all__ = [
    "ROOT_KEY",
    "Admission",
    "Admitted",
    "CertificateAuthority",
    "CheckedRequest",
    "Decision",
    "Hierarchy",
    "HierarchyConfig",
    "Issuer",
    "KeystoreSettings",
    "LocalAdmission",
    "NamingPolicy",
    "Rotator",
    "SigningWorkers",
    "check_request",
    "node_csr",
    "renewal_statement",
    "revocation_statement",
]
