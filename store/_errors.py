"""The errors of ``store``: one root, one subclass per kind of storage.

::

    StoreError                    something durable or secret could not be read or written
    ├── AuditError                the hash-chained audit log
    ├── AuthorityError            the CA's own authorities (root, intermediates, admins)
    ├── BeaconError               the epoch beacons
    ├── ChainStoreError           the consensus chain (blocks, commits, signing state)
    ├── DataDirectoryInUse        another process holds the data directory
    ├── FileStoreError            a small durable file (credentials, schedules)
    ├── KeyStoreError             a keystore (key directory or PKCS#11 token)
    ├── ObjectStoreError          an object store (a directory or an S3 bucket)
    │   └── ObjectStoreUnavailable  cannot reach it now: pause and retry
    ├── StateError                the replicated state (certificates, CT, stake...)
    └── TileError                 the CT tiles on disk
        └── TileCorrupted         tiles contradict each other or the committed state

Every error is raised ``from`` the library error it translates (sqlite3,
PKCS#11, OSError), and its message says what and where, never a secret.
"""

from __future__ import annotations


class StoreError(Exception):
    """Something durable or secret could not be read or written."""


class AuditError(StoreError):
    """The audit log cannot record or cannot be read; the message says where and why."""


class AuthorityError(StoreError):
    """The CA's authority database failed; wraps sqlite3 errors."""


class BeaconError(StoreError):
    """The beacon database cannot be read or written."""


class ChainStoreError(StoreError):
    """The chain database cannot be opened or written."""


class DataDirectoryInUse(StoreError):
    """Another process (a running node?) holds the data directory's lock."""


class FileStoreError(StoreError):
    """A small durable file (a credential, a key schedule) is unreadable."""


class KeyStoreError(StoreError):
    """Any keystore failure; the message says what and where, never the PIN."""


class ObjectStoreError(StoreError):
    """An object could not be read or written; the message names the store and key."""


class ObjectStoreUnavailable(ObjectStoreError):
    """The store cannot be reached right now (refused, timeout, 5xx, throttled): the
    caller pauses and retries."""


class StateError(StoreError):
    """The replicated state cannot be read or written, or a block does not follow it."""


class TileError(StoreError):
    """The tiles cannot be read or written."""


class TileCorrupted(TileError):
    """Tiles contradict each other or the committed state (tampering or damage)."""
