"""Everything durable or secret: files, keys, certificates, databases, the audit log."""

from ._audit import AuditLog, AuditRecord, AuditReport, verify_log
from ._blocks import ChainStore, StoredBlock, StoredEvidence
from ._certdb import (
    AuthorityRecord,
    CertificateRecord,
    CertificateStore,
)
from ._ctdb import (
    CheckpointRecord,
    CtDatabase,
    FingerprintRecord,
    ShardRecord,
    Submission,
)
from ._errors import (
    AuditError,
    CertStoreError,
    ChainStoreError,
    CheckpointConflict,
    CtStoreError,
    FileStoreError,
    KeyStoreError,
    LedgerError,
    StoreError,
    TileCorrupted,
    TileError,
)
from ._files import fsync_directory, write_atomic
from ._keystore import open_keystore
from ._layout import AdminCredential, DataDirectory, DurableFile, JsonFile, TileDirectory
from ._ledger import BeaconRecord, LedgerStore, StakeChange
from ._pkcs11 import Pkcs11KeyStore
from ._signer import (
    Algorithm,
    KeyStore,
    Signer,
    spki_sha256,
    verify_signature,
)
from ._softkeys import SoftwareKeyStore
from ._tiles import Appended, Bundle, TileLog
from ._tls import TlsCredential, create_self_signed, credential_paths

__all__ = [
    "AdminCredential",
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
    "DataDirectory",
    "DurableFile",
    "FileStoreError",
    "FingerprintRecord",
    "JsonFile",
    "KeyStore",
    "KeyStoreError",
    "LedgerError",
    "LedgerStore",
    "Pkcs11KeyStore",
    "ShardRecord",
    "Signer",
    "SoftwareKeyStore",
    "StakeChange",
    "StoreError",
    "StoredBlock",
    "StoredEvidence",
    "Submission",
    "TileCorrupted",
    "TileDirectory",
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
