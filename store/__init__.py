"""Everything durable or secret: files, keys, certificates, databases, the audit log."""

from ._audit import AuditError, AuditLog, AuditRecord, AuditReport, verify_log
from ._blocks import ChainStore, ChainStoreError, StoredBlock, StoredEvidence
from ._certdb import (
    AuthorityRecord,
    CertificateRecord,
    CertificateStore,
    CertStoreError,
)
from ._ctdb import (
    CheckpointConflict,
    CheckpointRecord,
    CtDatabase,
    CtStoreError,
    FingerprintRecord,
    ShardRecord,
    Submission,
)
from ._files import fsync_directory, write_atomic
from ._keystore import open_keystore
from ._ledger import BeaconRecord, LedgerError, LedgerStore, StakeChange
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
from ._tiles import Appended, Bundle, TileCorrupted, TileError, TileLog
from ._tls import TlsCredential, create_self_signed, credential_paths

__all__ = [
    "Algorithm",
    "Appended",
    "AuditError",
    "AuditLog",
    "AuditRecord",
    "AuditReport",
    "AuthorityRecord",
    "BeaconRecord",
    "Bundle",
    "CertStoreError",
    "CertificateRecord",
    "CertificateStore",
    "ChainStore",
    "ChainStoreError",
    "CheckpointConflict",
    "CheckpointRecord",
    "CtDatabase",
    "CtStoreError",
    "FingerprintRecord",
    "KeyStore",
    "KeyStoreError",
    "LedgerError",
    "LedgerStore",
    "Pkcs11KeyStore",
    "ShardRecord",
    "Signer",
    "SoftwareKeyStore",
    "StakeChange",
    "StoredBlock",
    "StoredEvidence",
    "Submission",
    "TileCorrupted",
    "TileError",
    "TileLog",
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
