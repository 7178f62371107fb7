"""Everything durable or secret: files, keys, certificates, databases, the audit log."""

from ._audit import AuditError, AuditLog, AuditRecord, AuditReport, verify_log
from ._certdb import (
    AuthorityRecord,
    CertificateRecord,
    CertificateStore,
    CertStoreError,
)
from ._files import fsync_directory, write_atomic
from ._keystore import open_keystore
from ._pkcs11 import Pkcs11KeyStore
from ._signer import (
    Algorithm,
    KeyStore,
    KeyStoreError,
    Signer,
    spki_sha256,
    verify_signature,
)
from ._softkeys import SoftwareKeyStore
from ._tls import TlsCredential, create_self_signed, credential_paths

__all__ = [
    "Algorithm",
    "AuditError",
    "AuditLog",
    "AuditRecord",
    "AuditReport",
    "AuthorityRecord",
    "CertStoreError",
    "CertificateRecord",
    "CertificateStore",
    "KeyStore",
    "KeyStoreError",
    "Pkcs11KeyStore",
    "Signer",
    "SoftwareKeyStore",
    "TlsCredential",
    "create_self_signed",
    "credential_paths",
    "fsync_directory",
    "open_keystore",
    "spki_sha256",
    "verify_log",
    "verify_signature",
    "write_atomic",
]
