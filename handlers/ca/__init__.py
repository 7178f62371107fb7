"""The certificate authority: hierarchy, policy, admission, issuance, revocation, rotation."""

from protocol import renewal_statement, revocation_statement

from ._admission import Admission, Admitted, Decision, LocalAdmission
from ._authority import ROOT_KEY, Hierarchy, HierarchyConfig, Issuer
from ._leaf import LeafSigner, LeafTemplate, LocalSigner
from ._policy import CheckedRequest, NamingPolicy, check_request, is_address
from ._profile import ProfileError, check_certificate, check_precertificate, validity
from ._publishing import (
    CertificateIssued,
    CertificateRevoked,
    LogPosition,
    Publisher,
    Publishers,
)
from ._rotation import Rotator, node_csr
from ._signing import KeystoreSettings, SigningWorkers
from .service import CertificateAuthority, Cluster, IssuanceCounts

__all__ = [
    "ROOT_KEY",
    "Admission",
    "Admitted",
    "CertificateAuthority",
    "CertificateIssued",
    "CertificateRevoked",
    "CheckedRequest",
    "Cluster",
    "Decision",
    "Hierarchy",
    "HierarchyConfig",
    "IssuanceCounts",
    "Issuer",
    "KeystoreSettings",
    "LeafSigner",
    "LeafTemplate",
    "LocalAdmission",
    "LocalSigner",
    "LogPosition",
    "NamingPolicy",
    "ProfileError",
    "Publisher",
    "Publishers",
    "Rotator",
    "SigningWorkers",
    "check_certificate",
    "check_precertificate",
    "check_request",
    "is_address",
    "node_csr",
    "renewal_statement",
    "revocation_statement",
    "validity",
]
