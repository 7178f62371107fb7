"""The replicated state of the cluster's CA: one SQLite file, one transaction per block.

``DATA/state/state.sqlite3`` holds everything every validator must hold the
same after executing the same blocks: the certificate registry (issued and
pending certificates, their names, revocations), DNS registrations, stake,
used proofs of work, each validator's announced public keys, and the CT log's
tree (its size and root per shard, the leaf-hash and submission indexes) with
the fingerprint index. A block's changes are written in one transaction
(:meth:`StateDatabase.apply`), together with the height they bring the state
to and the state hash, so the state is always exactly "after block *h*".

Beside the replicated tables it keeps what is this validator's own: its CT log
keys and signed tree heads, and the SCTs it signed. Those are never part of
the state hash.

Every replicated row has one canonical form (:meth:`StateDatabase.rows` and
the ``*_row`` helpers): a tuple that starts with its table's name. The state
hash is the multiset hash (:mod:`._statehash`) of all of them, so it can be
kept up to date block by block and recomputed from the file at start.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._errors import StateError
from ._sqlite import SqliteDatabase
from ._statehash import MultisetHash

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,           -- lowercase hex
    issuer TEXT NOT NULL,              -- SHA-256 (hex) of the issuing intermediate's DER
    validator TEXT NOT NULL,           -- the validator whose intermediate signs it
    spki_sha256 TEXT NOT NULL,
    not_before INTEGER NOT NULL,       -- seconds since 1970
    not_after INTEGER NOT NULL,
    issued_ms INTEGER NOT NULL,        -- the time of the block that committed it
    kind TEXT NOT NULL,                -- "client" | "node"
    precertificate BLOB NOT NULL,      -- the logged precertificate (DER)
    der BLOB,                          -- the certificate, once its decision is executed
    fingerprint TEXT,                  -- SHA-256 (hex) of der
    revoked_ms INTEGER,
    revocation_reason TEXT,
    ct_shard INTEGER,
    ct_index INTEGER,
    height INTEGER NOT NULL,           -- the block that committed the issuance
    position INTEGER NOT NULL          -- its index in that block
);
CREATE INDEX IF NOT EXISTS certificates_fingerprint ON certificates(fingerprint);
CREATE TABLE IF NOT EXISTS names (
    name TEXT NOT NULL,                -- DNS name or IPv6 address (compressed form)
    serial TEXT NOT NULL REFERENCES certificates(serial),
    position INTEGER NOT NULL,         -- its place in the certificate's SAN
    PRIMARY KEY (name, serial)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS names_serial ON names(serial);
CREATE TABLE IF NOT EXISTS registrations (
    name TEXT PRIMARY KEY,
    spki_sha256 TEXT NOT NULL,
    serial TEXT NOT NULL,
    addresses TEXT NOT NULL,           -- JSON array of IPv6 addresses
    time INTEGER NOT NULL              -- the statement's time, seconds
);
CREATE TABLE IF NOT EXISTS stake (
    key_id TEXT PRIMARY KEY,           -- SHA-256 (hex) of the key's DER SPKI
    amount INTEGER NOT NULL CHECK (amount >= 0)
);
CREATE TABLE IF NOT EXISTS used_work (
    hash BLOB PRIMARY KEY,             -- SHA-256(work prefix || nonce)
    epoch INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS used_work_epoch ON used_work(epoch);
CREATE TABLE IF NOT EXISTS validator_keys (
    validator TEXT PRIMARY KEY,        -- validator id
    keys BLOB NOT NULL                 -- deterministic CBOR of what it announced
);
CREATE TABLE IF NOT EXISTS isolated (
    validator TEXT PRIMARY KEY,        -- a validator the blocks proved faulty
    height INTEGER NOT NULL,           -- the block that proved it
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ct_shards (
    shard INTEGER PRIMARY KEY,
    size INTEGER NOT NULL,
    root BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS ct_entries (
    entry_hash BLOB PRIMARY KEY,       -- SHA-256(entry_type || signed entry): dedup key
    shard INTEGER NOT NULL,
    leaf_index INTEGER NOT NULL,
    timestamp INTEGER NOT NULL         -- milliseconds: the block's time
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ct_leaves (
    leaf_hash BLOB PRIMARY KEY,
    shard INTEGER NOT NULL,
    leaf_index INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fingerprints (
    sha256 BLOB PRIMARY KEY,           -- of the certificate's (or precertificate's) DER
    spki_sha256 BLOB NOT NULL,
    kind TEXT NOT NULL,                -- "x509" / "precert" (logged), "issued" (by the CA)
    shard INTEGER,
    leaf_index INTEGER,
    serial TEXT,
    first_seen_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS fingerprints_spki ON fingerprints(spki_sha256);
CREATE TABLE IF NOT EXISTS fingerprint_names (
    name TEXT NOT NULL,
    sha256 BLOB NOT NULL,
    PRIMARY KEY (name, sha256)
) WITHOUT ROWID;

-- this validator's own: never in the state hash
CREATE TABLE IF NOT EXISTS ct_logs (
    shard INTEGER PRIMARY KEY,
    key_name TEXT NOT NULL,            -- keystore name of this validator's key for the shard
    log_id BLOB NOT NULL,              -- SHA-256 of the key's SubjectPublicKeyInfo
    origin TEXT NOT NULL               -- checkpoint origin line
);
CREATE TABLE IF NOT EXISTS ct_heads (
    shard INTEGER PRIMARY KEY,
    size INTEGER NOT NULL,
    root BLOB NOT NULL,
    timestamp INTEGER NOT NULL,        -- milliseconds
    signature BLOB NOT NULL,           -- TLS digitally-signed TreeHeadSignature
    note TEXT NOT NULL                 -- the signed checkpoint
);
CREATE TABLE IF NOT EXISTS ct_scts (
    entry_hash BLOB NOT NULL,
    shard INTEGER NOT NULL,
    signature BLOB NOT NULL,           -- this validator's SCT signature for the entry
    PRIMARY KEY (entry_hash, shard)
) WITHOUT ROWID;
"""

TABLES = ("certificates", "names", "registrations", "stake", "used_work", "validator_keys",
          "isolated", "ct_shards", "ct_entries", "ct_leaves", "fingerprints", "fingerprint_names")
"""The replicated tables, in the order :meth:`StateDatabase.rows` walks them."""

_COLUMNS = {
    "certificates": ("serial", "issuer", "validator", "spki_sha256", "not_before",
                     "not_after", "issued_ms", "kind", "precertificate", "der", "fingerprint",
                     "revoked_ms", "revocation_reason", "ct_shard", "ct_index", "height",
                     "position"),
    "names": ("name", "serial", "position"),
    "registrations": ("name", "spki_sha256", "serial", "addresses", "time"),
    "stake": ("key_id", "amount"),
    "used_work": ("hash", "epoch"),
    "validator_keys": ("validator", "keys"),
    "isolated": ("validator", "height", "reason"),
    "ct_shards": ("shard", "size", "root"),
    "ct_entries": ("entry_hash", "shard", "leaf_index", "timestamp"),
    "ct_leaves": ("leaf_hash", "shard", "leaf_index"),
    "fingerprints": ("sha256", "spki_sha256", "kind", "shard", "leaf_index", "serial",
                     "first_seen_ms"),
    "fingerprint_names": ("name", "sha256"),
}
_KEYS = {
    "certificates": ("serial",),
    "names": ("name", "serial"),
    "registrations": ("name",),
    "stake": ("key_id",),
    "used_work": ("hash",),
    "validator_keys": ("validator",),
    "isolated": ("validator",),
    "ct_shards": ("shard",),
    "ct_entries": ("entry_hash",),
    "ct_leaves": ("leaf_hash",),
    "fingerprints": ("sha256",),
    "fingerprint_names": ("name", "sha256"),
}

Row = tuple[Any, ...]
"""A replicated row in canonical form: ``(table, column values...)``."""


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    """One certificate of the registry: issued (``der`` set) or pending its signature."""

    serial: str
    der: bytes
    """The certificate; empty while it waits for its signed-certificate decision."""
    fingerprint: str
    spki_sha256: str
    issuer: str
    """SHA-256 (hex) of the issuing intermediate's DER."""
    not_before: float
    not_after: float
    issued_at: float
    """The time (seconds) of the block that committed the issuance."""
    revoked_at: float | None
    revocation_reason: str | None
    names: tuple[str, ...] = ()
    validator: str = ""
    """The validator whose intermediate signs it."""
    kind: str = "client"
    precertificate: bytes = b""
    ct_shard: int | None = None
    ct_index: int | None = None
    height: int = 0
    """The block that committed the issuance, and the decision's index in it."""
    position: int = 0

    @property
    def pending(self) -> bool:
        return not self.der


@dataclass(frozen=True, slots=True)
class FingerprintRecord:
    sha256: bytes
    spki_sha256: bytes
    kind: str
    shard: int | None
    leaf_index: int | None
    serial: str | None
    first_seen: float
    names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CtEntryRecord:
    """Where the log holds a submission (the same on every validator)."""

    entry_hash: bytes
    shard: int
    leaf_index: int
    timestamp: int


@dataclass(frozen=True, slots=True)
class CtLogRecord:
    """This validator's own log for a shard: its key and identity."""

    shard: int
    key_name: str
    log_id: bytes
    origin: str


@dataclass(frozen=True, slots=True)
class TreeHead:
    """A signed tree head of this validator's log for a shard."""

    shard: int
    size: int
    root: bytes
    timestamp: int
    signature: bytes
    note: str


@dataclass
class StateChanges:
    """What one block changes: rows to write or delete per replicated table, this
    validator's own rows, and the state it brings the file to.

    ``upserts[table]`` are full canonical rows (``(table, columns...)``) written with
    ``INSERT OR REPLACE``; ``deletes[table]`` are their keys.
    """

    height: int
    block_id: bytes
    rows_hash: MultisetHash
    state_hash: bytes
    upserts: dict[str, list[Row]] = field(default_factory=dict)
    deletes: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    ct_logs: list[CtLogRecord] = field(default_factory=list)
    ct_heads: list[TreeHead] = field(default_factory=list)

    def upsert(self, row: Row) -> None:
        self.upserts.setdefault(row[0], []).append(row)

    def delete(self, table: str, key: tuple[Any, ...]) -> None:
        """Delete the row with ``key``; an upsert of it earlier in the block is dropped
        (:meth:`StateDatabase.apply` writes deletes before upserts)."""
        upserts = self.upserts.get(table)
        if upserts:
            positions = [_COLUMNS[table].index(k) + 1 for k in _KEYS[table]]
            self.upserts[table] = [r for r in upserts if tuple(r[p] for p in positions) != key]
        self.deletes.setdefault(table, []).append(key)


def certificate_row(record: CertificateRecord) -> Row:
    return ("certificates", record.serial, record.issuer, record.validator,
            record.spki_sha256, int(record.not_before), int(record.not_after),
            round(record.issued_at * 1000), record.kind, record.precertificate,
            record.der or None, record.fingerprint or None,
            None if record.revoked_at is None else round(record.revoked_at * 1000),
            record.revocation_reason, record.ct_shard, record.ct_index, record.height,
            record.position)


def stored_record(record: CertificateRecord) -> CertificateRecord:
    """``record`` exactly as :meth:`StateDatabase.certificate` reads it back once written
    (times in whole seconds or milliseconds, as the columns keep them): what a cache of
    the stored records may hold in the file's place. ``record`` itself when it is
    already so (a record the blocks made: its times come from whole seconds and a
    block's milliseconds), which saves building a copy."""
    if _as_stored(record):
        return record
    return _record(certificate_row(record)[1:], record.names)


def _as_stored(record: CertificateRecord) -> bool:
    """Whether reading ``record`` back once written would give an equal record, of the
    same types."""
    revoked = record.revoked_at
    return (type(record.not_before) is float and record.not_before.is_integer()
            and type(record.not_after) is float and record.not_after.is_integer()
            and type(record.issued_at) is float
            and round(record.issued_at * 1000) / 1000 == record.issued_at
            and (revoked is None or (type(revoked) is float
                                     and round(revoked * 1000) / 1000 == revoked))
            and type(record.der) is bytes and type(record.precertificate) is bytes)


def _record(row: Sequence[Any], names: tuple[str, ...]) -> CertificateRecord:
    (serial, issuer, validator, spki, not_before, not_after, issued_ms, kind, precert, der,
     fingerprint, revoked_ms, reason, shard, index, height, position) = row
    return CertificateRecord(
        serial=serial, der=bytes(der or b""), fingerprint=fingerprint or "", spki_sha256=spki,
        issuer=issuer, not_before=float(not_before), not_after=float(not_after),
        issued_at=issued_ms / 1000, revoked_at=None if revoked_ms is None else revoked_ms / 1000,
        revocation_reason=reason, names=names, validator=validator, kind=kind,
        precertificate=bytes(precert), ct_shard=shard, ct_index=index, height=height,
        position=position)


def registration_row(name: str, spki_sha256: str, serial: str, addresses: Sequence[str],
                     time: int) -> Row:
    return ("registrations", name, spki_sha256, serial, json.dumps(list(addresses)), time)


class StateDatabase(SqliteDatabase):
    """``DATA/state/state.sqlite3``: the replicated CA state and this validator's CT log."""

    error = StateError
    schema = SCHEMA
    thread_name = "state"

    # --- the state as a whole -------------------------------------------------------

    def height(self) -> int:
        """The height of the last block whose changes are in the file (0: none)."""
        row = self.read_one("SELECT value FROM meta WHERE key='height'")
        return int(row[0]) if row else 0

    def meta(self, key: str) -> bytes | None:
        row = self.read_one("SELECT value FROM meta WHERE key=?", (key,))
        return None if row is None else bytes(row[0])

    def _read_in(self, sql: str, keys: Sequence[Any]) -> list[Any]:
        """Every row of ``sql`` whose ``{marks}`` is filled with ``keys`` (at most 500
        a query): one query for a block's keys instead of one per key."""
        found: list[Any] = []
        for i in range(0, len(keys), 500):
            chunk = tuple(keys[i:i + 500])
            found += self.read_all(sql.format(marks=",".join("?" * len(chunk))), chunk)
        return found

    def rows(self) -> Iterator[Row]:
        """Every replicated row in canonical form (to recompute the state hash)."""
        for table in TABLES:
            columns = ", ".join(_COLUMNS[table])
            for row in self.read_all(f"SELECT {columns} FROM {table}"):
                yield (table, *(bytes(v) if isinstance(v, memoryview) else v for v in row))

    def apply(self, changes: StateChanges) -> None:
        """Write one block's changes, its height and state hash, in one transaction.

        :raises StateError: the file cannot be written, or the block does not follow
            the last one applied (nothing is written then).
        """
        def write(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT value FROM meta WHERE key='height'").fetchone()
            current = int(row[0]) if row else 0
            if changes.height != current + 1:
                raise StateError(f"block {changes.height} does not follow the state's "
                                 f"height {current}")
            for table in reversed(TABLES):  # children before the rows they refer to
                keys = changes.deletes.get(table)
                if keys:
                    where = " AND ".join(f"{k}=?" for k in _KEYS[table])
                    db.executemany(f"DELETE FROM {table} WHERE {where}", keys)
            for table in TABLES:  # parents before the rows that refer to them
                rows = changes.upserts.get(table)
                if not rows:
                    continue
                marks = ",".join("?" * len(_COLUMNS[table]))
                db.executemany(f"INSERT OR REPLACE INTO {table} "
                               f"({', '.join(_COLUMNS[table])}) VALUES ({marks})",
                               [r[1:] for r in rows])
            self._write_own(db, changes.ct_logs, changes.ct_heads)
            db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [
                ("height", str(changes.height).encode()), ("block_id", changes.block_id),
                ("rows_hash", changes.rows_hash.to_bytes()),
                ("state_hash", changes.state_hash)])
        self.write_now(write)

    def write_genesis(self, rows: Sequence[Row], rows_hash: MultisetHash,
                      state_hash: bytes) -> None:
        """The state before the first block (the configured genesis stake), once.

        :raises StateError: the state is past its genesis.
        """
        def write(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT value FROM meta WHERE key='height'").fetchone()
            if row is not None and int(row[0]) != 0:
                raise StateError("the state is past its genesis")
            for item in rows:
                table = item[0]
                marks = ",".join("?" * len(_COLUMNS[table]))
                db.execute(f"INSERT OR REPLACE INTO {table} ({', '.join(_COLUMNS[table])}) "
                           f"VALUES ({marks})", item[1:])
            db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [
                ("height", b"0"), ("rows_hash", rows_hash.to_bytes()),
                ("state_hash", state_hash)])
        self.write_now(write)

    @staticmethod
    def _write_own(db: sqlite3.Connection, logs: Sequence[CtLogRecord],
                   heads: Sequence[TreeHead]) -> None:
        db.executemany("INSERT OR REPLACE INTO ct_logs VALUES (?,?,?,?)",
                       [(r.shard, r.key_name, r.log_id, r.origin) for r in logs])
        db.executemany("INSERT OR REPLACE INTO ct_heads VALUES (?,?,?,?,?,?)",
                       [(h.shard, h.size, h.root, h.timestamp, h.signature, h.note)
                        for h in heads])

    def save_own(self, *, logs: Sequence[CtLogRecord] = (),
                 heads: Sequence[TreeHead] = ()) -> None:
        """This validator's own CT rows, outside a block (a new key, a re-signed head)."""
        self.write_now(lambda db: self._write_own(db, logs, heads))

    # --- certificates ---------------------------------------------------------------

    def _names(self, serial: str) -> tuple[str, ...]:
        return tuple(n for (n,) in self.read_all(
            "SELECT name FROM names WHERE serial=? ORDER BY position", (serial,)))

    def _certificate(self, row: Sequence[Any] | None) -> CertificateRecord | None:
        return None if row is None else _record(row, self._names(row[0]))

    _CERTIFICATE = ", ".join(_COLUMNS["certificates"])

    def certificate(self, serial: str) -> CertificateRecord | None:
        """The registry's record of ``serial``, issued or pending."""
        return self._certificate(self.read_one(
            f"SELECT {self._CERTIFICATE} FROM certificates WHERE serial=?", (serial,)))

    def certificates(self, serials: Sequence[str]) -> dict[str, CertificateRecord]:
        """The registry's records of those of ``serials`` it holds."""
        return {row[0]: _record(row, self._names(row[0])) for row in self._read_in(
            f"SELECT {self._CERTIFICATE} FROM certificates WHERE serial IN ({{marks}})",
            serials)}

    def get(self, serial: str) -> CertificateRecord | None:
        """The issued certificate ``serial`` (None if unknown or still pending)."""
        record = self.certificate(serial)
        return None if record is None or record.pending else record

    def by_fingerprint(self, fingerprint: str) -> CertificateRecord | None:
        return self._certificate(self.read_one(
            f"SELECT {self._CERTIFICATE} FROM certificates WHERE fingerprint=?",
            (fingerprint,)))

    def holders(self, name: str, now: float) -> list[CertificateRecord]:
        """Issued, unexpired, unrevoked certificates that carry ``name``."""
        rows = self.read_all(
            f"SELECT {', '.join('c.' + c for c in _COLUMNS['certificates'])} FROM names n "
            "JOIN certificates c ON c.serial = n.serial WHERE n.name=? AND c.der IS NOT NULL "
            "AND c.revoked_ms IS NULL AND c.not_after > ?", (name, now))
        return [_record(r, self._names(r[0])) for r in rows]

    def other_key_holder(self, names: Sequence[str], spki_sha256: str,
                         now: float) -> str | None:
        """The fingerprint of the latest issued, unexpired, unrevoked certificate that
        carries one of ``names`` for a key other than ``spki_sha256`` (the certificate a
        rekeyed one replaces), or None."""
        marks = ",".join("?" * len(names))
        row = self.read_one(
            "SELECT c.fingerprint FROM names n JOIN certificates c ON c.serial = n.serial "
            f"WHERE n.name IN ({marks}) AND c.der IS NOT NULL AND c.revoked_ms IS NULL "
            "AND c.not_after > ? AND c.spki_sha256 != ? "
            "ORDER BY c.issued_ms DESC, c.height DESC, c.position DESC LIMIT 1",
            (*names, now, spki_sha256))
        return None if row is None else str(row[0])

    def claimants_of(self, names: Sequence[str]) -> dict[str, list[str]]:
        """The serials of :meth:`claims` of each of ``names``, without reading their records
        (the caller keeps them); names no certificate claims are left out."""
        found: dict[str, list[str]] = {}
        for name, serial in self._read_in(
                "SELECT n.name, n.serial FROM names n JOIN certificates c "
                "ON c.serial = n.serial WHERE n.name IN ({marks}) AND c.revoked_ms IS NULL",
                names):
            found.setdefault(name, []).append(serial)
        return found

    def claims(self, name: str) -> list[CertificateRecord]:
        """Every unrevoked certificate, issued or pending, that carries ``name`` (the
        ownership rule decides which still hold it)."""
        rows = self.read_all(
            f"SELECT {', '.join('c.' + c for c in _COLUMNS['certificates'])} FROM names n "
            "JOIN certificates c ON c.serial = n.serial WHERE n.name=? "
            "AND c.revoked_ms IS NULL", (name,))
        return [_record(r, self._names(r[0])) for r in rows]

    def valid_certificates(self, now: float) -> list[CertificateRecord]:
        """Every issued, unexpired, unrevoked certificate (the DNS zones' source)."""
        rows = self.read_all(f"SELECT {self._CERTIFICATE} FROM certificates WHERE der IS NOT "
                             "NULL AND revoked_ms IS NULL AND not_after > ? "
                             "ORDER BY issued_ms, height, position",
                             (now,))
        return [_record(r, self._names(r[0])) for r in rows]

    def count(self) -> int:
        return int(self.read_one("SELECT count(*) FROM certificates WHERE der IS NOT NULL")[0])

    # --- registrations, stake, used work, validator keys -----------------------------

    def registrations(self) -> dict[str, tuple[str, str, list[str], int]]:
        """name -> (spki_sha256, serial, addresses, time)."""
        return {r[0]: (r[1], r[2], json.loads(r[3]), int(r[4]))
                for r in self.read_all("SELECT * FROM registrations")}

    def balance(self, key_id: str) -> int:
        row = self.read_one("SELECT amount FROM stake WHERE key_id=?", (key_id,))
        return int(row[0]) if row else 0

    def known(self, key_id: str) -> bool:
        return self.read_one("SELECT 1 FROM stake WHERE key_id=?", (key_id,)) is not None

    def work_used(self, digest: bytes) -> bool:
        return self.read_one("SELECT 1 FROM used_work WHERE hash=?", (digest,)) is not None

    def works_used(self, digests: Sequence[bytes]) -> set[bytes]:
        """Those of ``digests`` that were used (:meth:`work_used`)."""
        return {bytes(h) for (h,) in self._read_in(
            "SELECT hash FROM used_work WHERE hash IN ({marks})", digests)}

    def stale_work(self, before_epoch: int) -> list[tuple[bytes, int]]:
        """Used work of epochs before ``before_epoch`` (no longer acceptable anyway)."""
        return [(bytes(h), int(e)) for h, e in self.read_all(
            "SELECT hash, epoch FROM used_work WHERE epoch < ?", (before_epoch,))]

    def validator_keys(self) -> dict[str, bytes]:
        """validator id -> what it announced (deterministic CBOR)."""
        return {v: bytes(k) for v, k in self.read_all("SELECT validator, keys FROM "
                                                      "validator_keys")}

    def isolated(self) -> dict[str, int]:
        """validator id -> the height of the block that proved it faulty (isolated)."""
        return {v: h for v, h in self.read_all("SELECT validator, height FROM isolated")}

    # --- certificate transparency ---------------------------------------------------

    def ct_shards(self) -> list[tuple[int, int, bytes]]:
        """(shard, size, root) of every shard, in order."""
        return [(int(s), int(n), bytes(r)) for s, n, r in self.read_all(
            "SELECT shard, size, root FROM ct_shards ORDER BY shard")]

    def ct_entry(self, entry_hash: bytes) -> CtEntryRecord | None:
        row = self.read_one("SELECT * FROM ct_entries WHERE entry_hash=?", (entry_hash,))
        return None if row is None else CtEntryRecord(bytes(row[0]), row[1], row[2], row[3])

    def ct_entries(self, entry_hashes: Sequence[bytes]) -> dict[bytes, CtEntryRecord]:
        return {bytes(row[0]): CtEntryRecord(bytes(row[0]), row[1], row[2], row[3])
                for row in self._read_in("SELECT * FROM ct_entries WHERE entry_hash IN "
                                         "({marks})", entry_hashes)}

    def leaf_index(self, leaf_hash: bytes) -> tuple[int, int] | None:
        """(shard, index) of a leaf hash."""
        row = self.read_one("SELECT shard, leaf_index FROM ct_leaves WHERE leaf_hash=?",
                            (leaf_hash,))
        return (int(row[0]), int(row[1])) if row else None

    def ct_logs(self) -> list[CtLogRecord]:
        return [CtLogRecord(r[0], r[1], bytes(r[2]), r[3])
                for r in self.read_all("SELECT * FROM ct_logs ORDER BY shard")]

    def ct_head(self, shard: int) -> TreeHead | None:
        row = self.read_one("SELECT * FROM ct_heads WHERE shard=?", (shard,))
        return None if row is None else TreeHead(row[0], row[1], bytes(row[2]), row[3],
                                                 bytes(row[4]), row[5])

    def sct_signature(self, entry_hash: bytes, shard: int) -> bytes | None:
        row = self.read_one("SELECT signature FROM ct_scts WHERE entry_hash=? AND shard=?",
                            (entry_hash, shard))
        return None if row is None else bytes(row[0])

    def save_sct(self, entry_hash: bytes, shard: int, signature: bytes) -> None:
        """Keep an SCT this validator signed (the next request for it gets the same one)."""
        self.submit(lambda db: db.execute("INSERT OR IGNORE INTO ct_scts VALUES (?,?,?)",
                                          (entry_hash, shard, signature)))

    # --- fingerprints ---------------------------------------------------------------

    def _fingerprint(self, row: Any) -> FingerprintRecord:
        names = tuple(n for (n,) in self.read_all(
            "SELECT name FROM fingerprint_names WHERE sha256=? ORDER BY name", (row[0],)))
        return FingerprintRecord(bytes(row[0]), bytes(row[1]), row[2], row[3], row[4],
                                 row[5], row[6] / 1000, names)

    def fingerprint(self, sha256: bytes) -> FingerprintRecord | None:
        row = self.read_one("SELECT * FROM fingerprints WHERE sha256=?", (sha256,))
        return self._fingerprint(row) if row else None

    def fingerprints(self, sha256s: Sequence[bytes]) -> dict[bytes, FingerprintRecord]:
        """The index's records of those of ``sha256s`` it holds."""
        return {bytes(row[0]): self._fingerprint(row) for row in self._read_in(
            "SELECT * FROM fingerprints WHERE sha256 IN ({marks})", sha256s)}

    def fingerprints_by_spki(self, spki_sha256: bytes,
                             limit: int = 100) -> list[FingerprintRecord]:
        rows = self.read_all("SELECT * FROM fingerprints WHERE spki_sha256=? "
                             "ORDER BY first_seen_ms DESC LIMIT ?", (spki_sha256, limit))
        return [self._fingerprint(r) for r in rows]

    def fingerprints_by_name(self, name: str, limit: int = 100) -> list[FingerprintRecord]:
        rows = self.read_all("SELECT f.* FROM fingerprint_names n JOIN fingerprints f "
                             "ON f.sha256 = n.sha256 WHERE n.name=? "
                             "ORDER BY f.first_seen_ms DESC LIMIT ?", (name, limit))
        return [self._fingerprint(r) for r in rows]
