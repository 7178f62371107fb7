"""The errors of ``store``: one root, one subclass per kind of storage.

::

    StoreError                    something durable or secret could not be read or written
    ├── AuditError                the hash-chained audit log
    ├── CertStoreError            the certificate database
    ├── ChainStoreError           the consensus chain (blocks, commits, signing state)
    ├── CtStoreError              the CT log's database
    │   └── CheckpointConflict    another writer advanced the log first
    ├── FileStoreError            a small durable file (credentials, schedules, registrations)
    ├── KeyStoreError             a keystore (key directory or PKCS#11 token)
    ├── LedgerError               the stake ledger
    └── TileError                 the CT tiles on disk
        └── TileCorrupted         tiles contradict each other or the committed checkpoint

Every error is raised ``from`` the library error it translates (sqlite3,
PKCS#11, OSError), and its message says what and where, never a secret.
"""

from __future__ import annotations


class StoreError(Exception):
    """Something durable or secret could not be read or written."""


class AuditError(StoreError):
    """The audit log cannot record or cannot be read; the message says where and why."""


class CertStoreError(StoreError):
    """The certificate database failed; wraps sqlite3 errors."""


class ChainStoreError(StoreError):
    """The chain database cannot be opened or written."""


class CtStoreError(StoreError):
    """The CT database failed; wraps sqlite3 errors."""


class CheckpointConflict(CtStoreError):
    """The checkpoint moved since this writer read it: another writer advanced the log."""


class FileStoreError(StoreError):
    """A small durable file (a credential, a key schedule, registrations) is unreadable."""


class KeyStoreError(StoreError):
    """Any keystore failure; the message says what and where, never the PIN."""


class LedgerError(StoreError):
    """The stake ledger cannot be read or written."""


class TileError(StoreError):
    """The tiles cannot be read or written."""


class TileCorrupted(TileError):
    """Tiles contradict each other or the committed checkpoint (tampering or damage)."""
