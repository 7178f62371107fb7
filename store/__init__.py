"""Everything durable or secret: files, keys, databases, tiles, the audit log."""

from ._audit import AuditLog, AuditRecord, AuditReport, verify_log
from ._audit_archive import ArchiveReport, SegmentUploader, verify_archive
from ._authorities import AuthorityRecord, AuthorityStore
from ._beacons import BeaconRecord, BeaconStore
from ._blocks import ChainStore, StoredBlock, StoredEvidence
from ._errors import (
    AuditError,
    AuthorityError,
    BeaconError,
    ChainStoreError,
    DataDirectoryInUse,
    FileStoreError,
    KeyStoreError,
    ObjectStoreError,
    ObjectStoreUnavailable,
    StateError,
    StoreError,
    TileCorrupted,
    TileError,
)
from ._files import fsync_directory, write_atomic
from ._keystore import open_keystore
from ._layout import AdminCredential, DataDirectory, DurableFile, JsonFile, TileDirectory
from ._objects import FilesystemObjects, ObjectStore
from ._pkcs11 import Pkcs11KeyStore
from ._s3 import (
    AwsCredentials,
    LockedBucket,
    ObjectVersion,
    S3Location,
    S3Objects,
    aws_credentials,
)
from ._signer import (
    ECDSA_WITH_SHA256,
    Algorithm,
    KeyStore,
    Signer,
    spki_sha256,
    verify_signature,
)
from ._softkeys import SoftwareKeyStore
from ._state import (
    CertificateRecord,
    CtEntryRecord,
    CtLogRecord,
    FingerprintRecord,
    Row,
    StateChanges,
    StateDatabase,
    TreeHead,
    certificate_row,
    registration_row,
    stored_record,
)
from ._statehash import MultisetHash, state_hash
from ._tiles import Appended, Bundle, TileLog
from ._tls import TlsCredential, create_self_signed, credential_paths

__all__ = [
    "ECDSA_WITH_SHA256",
    "AdminCredential",
    "Algorithm",
    "Appended",
    "ArchiveReport",
    "AuditError",
    "AuditLog",
    "AuditRecord",
    "AuditReport",
    "AuthorityError",
    "AuthorityRecord",
    "AuthorityStore",
    "AwsCredentials",
    "BeaconError",
    "BeaconRecord",
    "BeaconStore",
    "Bundle",
    "CertificateRecord",
    "ChainStore",
    "ChainStoreError",
    "CtEntryRecord",
    "CtLogRecord",
    "DataDirectory",
    "DataDirectoryInUse",
    "DurableFile",
    "FileStoreError",
    "FilesystemObjects",
    "FingerprintRecord",
    "JsonFile",
    "KeyStore",
    "KeyStoreError",
    "LockedBucket",
    "MultisetHash",
    "ObjectStore",
    "ObjectStoreError",
    "ObjectStoreUnavailable",
    "ObjectVersion",
    "Pkcs11KeyStore",
    "Row",
    "S3Location",
    "S3Objects",
    "SegmentUploader",
    "Signer",
    "SoftwareKeyStore",
    "StateChanges",
    "StateDatabase",
    "StateError",
    "StoreError",
    "StoredBlock",
    "StoredEvidence",
    "TileCorrupted",
    "TileDirectory",
    "TileError",
    "TileLog",
    "TlsCredential",
    "TreeHead",
    "aws_credentials",
    "certificate_row",
    "create_self_signed",
    "credential_paths",
    "fsync_directory",
    "open_keystore",
    "registration_row",
    "spki_sha256",
    "state_hash",
    "stored_record",
    "verify_archive",
    "verify_log",
    "verify_signature",
    "write_atomic",
]
