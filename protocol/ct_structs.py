"""Certificate Transparency structures (RFC 6962 v1, c2sp.org/static-ct-api), without I/O.

Everything a log signs or stores and everything a client verifies, as bytes:

- ``TimestampedEntry`` / ``MerkleTreeLeaf`` (RFC 6962 §3.4), x509 and precert entries;
- ``SignedCertificateTimestamp`` (§3.2) with the static-ct-api ``leaf_index``
  extension, its signed input, and the SCT list of the X.509 extension (§3.3);
- the tree head signature input (§3.5), the C2SP checkpoint note and its
  RFC 6962 note signature (c2sp.org/tlog-checkpoint, c2sp.org/signed-note);
- the static-ct-api ``TileLeaf`` of data tiles and the tile paths;
- the precertificate TBS (the poison extension removed, in DER), and the final
  certificate assembled from the precertificate, an SCT list and a signature;
- signature checks of SCTs, tree heads and checkpoints (ECDSA P-256, SHA-256).

Parsing errors raise :class:`StructureError`; failed signature checks
:class:`SignatureError`. The TLS presentation language is big-endian with
length prefixes of 1, 2 or 3 bytes as each field declares.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

V1 = 0
"""``Version`` v1."""
X509_ENTRY = 0
PRECERT_ENTRY = 1
ENTRY_TYPES = {X509_ENTRY: "x509", PRECERT_ENTRY: "precert"}
CERTIFICATE_TIMESTAMP = 0
"""``SignatureType`` of an SCT."""
TREE_HASH = 1
"""``SignatureType`` of a tree head."""
TIMESTAMPED_ENTRY = 0
"""``MerkleLeafType``."""
HASH_SHA256 = 4
SIG_ECDSA = 3
LEAF_INDEX_EXTENSION = 0
"""static-ct-api ``ExtensionType`` of ``leaf_index``."""
MAX_LEAF_INDEX = (1 << 40) - 1

SCT_LIST_OID = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")
"""The X.509v3 extension that embeds SCTs in a certificate (RFC 6962 §3.3)."""
POISON_OID = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.3")
"""The critical poison extension of a precertificate (RFC 6962 §3.1)."""
NOTE_SIGNATURE_RFC6962 = 0x05
"""signed-note signature type of an RFC 6962 ``TreeHeadSignature``."""


class StructureError(ValueError):
    """Bytes that are not the CT structure they should be."""


class SignatureError(ValueError):
    """A CT signature (SCT, tree head, checkpoint) does not verify."""


# --- TLS encoding helpers ------------------------------------------------------------


def _vec(data: bytes, length_bytes: int) -> bytes:
    if len(data) >= 1 << (8 * length_bytes):
        raise StructureError(f"{len(data)} bytes do not fit a {length_bytes}-byte length")
    return len(data).to_bytes(length_bytes, "big") + data


class _Reader:
    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str, pos: int = 0) -> None:
        self.data = data
        self.pos = pos
        self.what = what

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise StructureError(f"{self.what}: truncated ({len(self.data) - self.pos} bytes "
                                 f"left, {n} needed)")
        out = self.data[self.pos:end]
        self.pos = end
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vec(self, length_bytes: int) -> bytes:
        return self.take(self.uint(length_bytes))

    def done(self) -> None:
        if self.pos != len(self.data):
            raise StructureError(f"{self.what}: {len(self.data) - self.pos} trailing bytes")


# --- extensions ------------------------------------------------------------------------


def leaf_index_extensions(index: int) -> bytes:
    """``CtExtensions`` holding only ``leaf_index`` (8 bytes on the wire with its length)."""
    if not 0 <= index <= MAX_LEAF_INDEX:
        raise StructureError(f"leaf index {index} does not fit 40 bits")
    return bytes([LEAF_INDEX_EXTENSION]) + _vec(index.to_bytes(5, "big"), 2)


def parse_extensions(data: bytes) -> dict[int, bytes]:
    """The static-ct-api ``Extension`` list of a ``CtExtensions`` value, by type."""
    r = _Reader(data, "CtExtensions")
    out: dict[int, bytes] = {}
    while r.pos < len(data):
        kind = r.uint(1)
        value = r.vec(2)
        if kind in out:
            raise StructureError(f"CtExtensions: extension {kind} appears twice")
        out[kind] = value
    return out


def leaf_index_of(extensions: bytes) -> int:
    """The ``leaf_index`` in ``extensions``.

    :raises StructureError: there is none, or it is not 5 bytes.
    """
    value = parse_extensions(extensions).get(LEAF_INDEX_EXTENSION)
    if value is None:
        raise StructureError("CtExtensions: no leaf_index extension")
    if len(value) != 5:
        raise StructureError(f"CtExtensions: leaf_index is {len(value)} bytes, not 5")
    return int.from_bytes(value, "big")


# --- entries ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TimestampedEntry:
    """RFC 6962 §3.4 ``TimestampedEntry``."""

    timestamp: int
    """Milliseconds since the epoch."""
    entry_type: int
    """:data:`X509_ENTRY` or :data:`PRECERT_ENTRY`."""
    certificate: bytes = b""
    """x509 entry: the leaf certificate's DER."""
    issuer_key_hash: bytes = b""
    """precert entry: SHA-256 of the issuer's DER SubjectPublicKeyInfo."""
    tbs_certificate: bytes = b""
    """precert entry: the precertificate's TBSCertificate without the poison extension."""
    extensions: bytes = b""
    """``CtExtensions``: the ``leaf_index`` extension in this log."""

    def signed_entry(self) -> bytes:
        """The ``signed_entry`` select: what the SCT covers besides timestamp and extensions."""
        if self.entry_type == X509_ENTRY:
            return _vec(self.certificate, 3)
        if self.entry_type == PRECERT_ENTRY:
            if len(self.issuer_key_hash) != 32:
                raise StructureError("issuer_key_hash must be 32 bytes")
            return self.issuer_key_hash + _vec(self.tbs_certificate, 3)
        raise StructureError(f"unknown LogEntryType {self.entry_type}")

    def encode(self) -> bytes:
        return (struct.pack(">QH", self.timestamp, self.entry_type) + self.signed_entry()
                + _vec(self.extensions, 2))

    def merkle_tree_leaf(self) -> bytes:
        """``MerkleTreeLeaf``: version v1, ``timestamped_entry``, then this entry."""
        return bytes([V1, TIMESTAMPED_ENTRY]) + self.encode()

    @property
    def leaf_index(self) -> int:
        return leaf_index_of(self.extensions)

    @classmethod
    def read(cls, r: _Reader) -> TimestampedEntry:
        timestamp = r.uint(8)
        entry_type = r.uint(2)
        if entry_type == X509_ENTRY:
            cert = r.vec(3)
            return cls(timestamp=timestamp, entry_type=entry_type, certificate=cert,
                       extensions=r.vec(2))
        if entry_type == PRECERT_ENTRY:
            key_hash = r.take(32)
            tbs = r.vec(3)
            return cls(timestamp=timestamp, entry_type=entry_type, issuer_key_hash=key_hash,
                       tbs_certificate=tbs, extensions=r.vec(2))
        raise StructureError(f"{r.what}: unknown LogEntryType {entry_type}")

    @classmethod
    def parse(cls, data: bytes) -> TimestampedEntry:
        r = _Reader(data, "TimestampedEntry")
        entry = cls.read(r)
        r.done()
        return entry


def parse_merkle_tree_leaf(data: bytes) -> TimestampedEntry:
    """The ``TimestampedEntry`` of a ``MerkleTreeLeaf`` (``leaf_input`` of ``get-entries``)."""
    r = _Reader(data, "MerkleTreeLeaf")
    version, leaf_type = r.uint(1), r.uint(1)
    if version != V1 or leaf_type != TIMESTAMPED_ENTRY:
        raise StructureError(f"MerkleTreeLeaf: version {version}, leaf type {leaf_type}")
    entry = TimestampedEntry.read(r)
    r.done()
    return entry


@dataclass(frozen=True, slots=True, kw_only=True)
class TileLeaf:
    """One entry of a static-ct-api data tile."""

    entry: TimestampedEntry
    pre_certificate: bytes = b""
    """precert entries: the submitted precertificate's DER."""
    chain_fingerprints: tuple[bytes, ...] = ()
    """SHA-256 of each issuer certificate of the submitted chain, leaf's issuer first."""

    def encode(self) -> bytes:
        out = self.entry.encode()
        if self.entry.entry_type == PRECERT_ENTRY:
            out += _vec(self.pre_certificate, 3)
        return out + _vec(b"".join(self.chain_fingerprints), 2)

    @classmethod
    def read(cls, r: _Reader) -> TileLeaf:
        entry = TimestampedEntry.read(r)
        pre = r.vec(3) if entry.entry_type == PRECERT_ENTRY else b""
        chain = r.vec(2)
        if len(chain) % 32:
            raise StructureError(f"{r.what}: certificate_chain of {len(chain)} bytes is not a "
                                 "list of 32-byte fingerprints")
        return cls(entry=entry, pre_certificate=pre,
                   chain_fingerprints=tuple(chain[i:i + 32] for i in range(0, len(chain), 32)))

    @classmethod
    def parse(cls, data: bytes) -> TileLeaf:
        """One encoded ``TileLeaf`` (an item of :func:`split_data_tile`)."""
        r = _Reader(data, "TileLeaf")
        leaf = cls.read(r)
        r.done()
        return leaf


def extra_data(leaf: TileLeaf, chain: list[bytes]) -> bytes:
    """The ``extra_data`` of ``get-entries`` (RFC 6962 §4.6): the certificate chain for
    an x509 entry, the ``PrecertChainEntry`` for a precert entry."""
    certificates = _vec(b"".join(_vec(c, 3) for c in chain), 3)
    if leaf.entry.entry_type == PRECERT_ENTRY:
        return _vec(leaf.pre_certificate, 3) + certificates
    return certificates


def parse_extra_data(entry_type: int, data: bytes) -> tuple[bytes, list[bytes]]:
    """(precertificate or empty, chain) of an ``extra_data`` value."""
    r = _Reader(data, "extra_data")
    pre = r.vec(3) if entry_type == PRECERT_ENTRY else b""
    body = _Reader(r.vec(3), "extra_data chain")
    r.done()
    chain = []
    while body.pos < len(body.data):
        chain.append(body.vec(3))
    return pre, chain


def parse_data_tile(data: bytes) -> list[TileLeaf]:
    """Every ``TileLeaf`` of a data tile, in order."""
    r = _Reader(data, "data tile")
    out = []
    while r.pos < len(data):
        out.append(TileLeaf.read(r))
    return out


def split_data_tile(data: bytes) -> list[bytes]:
    """The encoded ``TileLeaf`` items of a data tile, each as its own bytes."""
    r = _Reader(data, "data tile")
    out = []
    while r.pos < len(data):
        start = r.pos
        TileLeaf.read(r)
        out.append(data[start:r.pos])
    return out


def tile_leaf_header(item: bytes) -> tuple[int, int, int]:
    """``(timestamp, entry_type, length of the TimestampedEntry)`` of an encoded
    ``TileLeaf``, reading only the lengths (the fast path of subscriptions)."""
    try:
        timestamp, entry_type = struct.unpack_from(">QH", item)
        if entry_type == X509_ENTRY:
            pos = 13 + int.from_bytes(item[10:13], "big")
        elif entry_type == PRECERT_ENTRY:
            pos = 45 + int.from_bytes(item[42:45], "big")
        else:
            raise StructureError(f"TileLeaf: unknown LogEntryType {entry_type}")
        end = pos + 2 + int.from_bytes(item[pos:pos + 2], "big")
    except struct.error:
        raise StructureError("TileLeaf: truncated") from None
    if end > len(item):
        raise StructureError("TileLeaf: truncated")
    return timestamp, entry_type, end


def timestamped_entry_of_tile_leaf(item: bytes) -> bytes:
    """The encoded ``TimestampedEntry`` at the start of one encoded ``TileLeaf``."""
    return item[:tile_leaf_header(item)[2]]


def tile_path(level: int | str, index: int, width: int = 256) -> str:
    """``tile/<L>/<N>[.p/<W>]`` with ``N`` in 3-digit elements (``x001/x234/067``).

    ``level`` is ``0``..``5`` for hash tiles or ``"data"`` for data tiles.
    """
    if index < 0 or not 0 < width <= 256:
        raise ValueError(f"bad tile index {index} or width {width}")
    parts = []
    n = index
    while True:
        parts.append(n % 1000)
        n //= 1000
        if n == 0:
            break
    parts.reverse()
    text = "/".join([f"x{p:03d}" for p in parts[:-1]] + [f"{parts[-1]:03d}"])
    path = f"tile/{level}/{text}"
    if width < 256:
        path += f".p/{width}"
    return path


# --- SCTs --------------------------------------------------------------------------------


def digitally_signed(signature: bytes) -> bytes:
    """A TLS ``digitally-signed`` value: SHA-256, ECDSA, the DER signature."""
    return bytes([HASH_SHA256, SIG_ECDSA]) + _vec(signature, 2)


def parse_digitally_signed(data: bytes) -> bytes:
    """The DER ECDSA signature in a ``digitally-signed`` value (SHA-256 + ECDSA only)."""
    r = _Reader(data, "digitally-signed")
    hash_alg, sig_alg = r.uint(1), r.uint(1)
    if (hash_alg, sig_alg) != (HASH_SHA256, SIG_ECDSA):
        raise StructureError(f"digitally-signed: algorithms ({hash_alg}, {sig_alg}) are not "
                             "SHA-256 with ECDSA")
    signature = r.vec(2)
    r.done()
    return signature


def sct_signed_data(timestamp: int, entry_type: int, signed_entry: bytes,
                    extensions: bytes) -> bytes:
    """What an SCT's signature covers (RFC 6962 §3.2)."""
    return (struct.pack(">BBQH", V1, CERTIFICATE_TIMESTAMP, timestamp, entry_type)
            + signed_entry + _vec(extensions, 2))


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedCertificateTimestamp:
    """RFC 6962 §3.2 ``SignedCertificateTimestamp``, v1."""

    log_id: bytes
    """SHA-256 of the log's DER SubjectPublicKeyInfo."""
    timestamp: int
    extensions: bytes
    signature: bytes
    """The ``digitally-signed`` value (algorithms and DER signature)."""
    version: int = V1

    def encode(self) -> bytes:
        return (bytes([self.version]) + self.log_id + struct.pack(">Q", self.timestamp)
                + _vec(self.extensions, 2) + self.signature)

    @property
    def leaf_index(self) -> int:
        return leaf_index_of(self.extensions)

    @classmethod
    def parse(cls, data: bytes) -> SignedCertificateTimestamp:
        r = _Reader(data, "SignedCertificateTimestamp")
        version = r.uint(1)
        if version != V1:
            raise StructureError(f"SignedCertificateTimestamp: version {version} is not v1")
        log_id = r.take(32)
        timestamp = r.uint(8)
        extensions = r.vec(2)
        start = r.pos
        r.take(2)
        r.vec(2)
        r.done()
        return cls(log_id=log_id, timestamp=timestamp, extensions=extensions,
                   signature=data[start:], version=version)

    def to_item(self) -> dict[str, Any]:
        """The RFC 6962 §4.1 ``add-chain`` output, byte strings as bytes."""
        return {"sct_version": self.version, "id": self.log_id, "timestamp": self.timestamp,
                "extensions": self.extensions, "signature": self.signature}


def encode_sct_list(scts: list[bytes]) -> bytes:
    """``SignedCertificateTimestampList`` (RFC 6962 §3.3) of serialized SCTs."""
    if not scts:
        raise StructureError("an SCT list needs at least one SCT")
    return _vec(b"".join(_vec(s, 2) for s in scts), 2)


def parse_sct_list(data: bytes) -> list[bytes]:
    r = _Reader(data, "SignedCertificateTimestampList")
    body = _Reader(r.vec(2), "SignedCertificateTimestampList")
    r.done()
    out = []
    while body.pos < len(body.data):
        out.append(body.vec(2))
    if not out:
        raise StructureError("SignedCertificateTimestampList: empty")
    return out


def check_sct_list(data: bytes) -> int:
    """How many SCTs the TLS-encoded ``SignedCertificateTimestampList`` ``data`` holds,
    each laid out as a v1 SCT (what :meth:`SignedCertificateTimestamp.parse` reads):
    checked by positions, without building them (a validator checks every
    ``certificate`` decision's list before it votes).

    :raises StructureError: it is not such a list, or is empty.
    """
    size = len(data)
    if size < 2 or int.from_bytes(data[:2], "big") != size - 2:
        raise StructureError("SignedCertificateTimestampList: its length is not its size")
    pos, count = 2, 0
    while pos < size:
        start = pos + 2
        end = start + int.from_bytes(data[pos:start], "big")
        # version (1, v1), log_id (32), timestamp (8), extensions <0..2^16-1>,
        # hash and signature algorithms (2), signature <0..2^16-1>
        signature = start + 43 + int.from_bytes(data[start + 41:start + 43], "big")
        if end > size or end < start + 47 or data[start] != V1 or signature + 4 > end \
                or signature + 4 + int.from_bytes(data[signature + 2:signature + 4],
                                                  "big") != end:
            raise StructureError(f"SignedCertificateTimestampList: SCT {count} is not a v1 "
                                 "SCT")
        pos, count = end, count + 1
    if not count:
        raise StructureError("SignedCertificateTimestampList: empty")
    return count


def sct_list_extension_value(scts: list[bytes]) -> bytes:
    """The extnValue contents of the SCT list extension: a DER OCTET STRING of the list."""
    return der_tlv(0x04, encode_sct_list(scts))


def embedded_scts(cert: x509.Certificate) -> list[SignedCertificateTimestamp]:
    """The SCTs embedded in ``cert`` (empty if it has none)."""
    try:
        ext = cert.extensions.get_extension_for_oid(SCT_LIST_OID)
    except x509.ExtensionNotFound:
        return []
    value = ext.value
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else value.public_bytes()
    tag, content, rest = der_read(raw, 0)
    if tag != 0x04 or rest != len(raw):
        raise StructureError("the SCT list extension is not one OCTET STRING")
    return [SignedCertificateTimestamp.parse(s) for s in parse_sct_list(content)]


# --- tree heads and checkpoints ---------------------------------------------------------------


def tree_head_signed_data(timestamp: int, tree_size: int, root: bytes) -> bytes:
    """What an STH's ``tree_head_signature`` covers (RFC 6962 §3.5)."""
    if len(root) != 32:
        raise StructureError("sha256_root_hash must be 32 bytes")
    return struct.pack(">BBQQ", V1, TREE_HASH, timestamp, tree_size) + root


def checkpoint_body(origin: str, tree_size: int, root: bytes) -> str:
    """The note text of a C2SP checkpoint: origin, size, base64 root, each on a line."""
    return f"{origin}\n{tree_size}\n{base64.b64encode(root).decode()}\n"


def note_key_id(key_name: str, log_id: bytes) -> bytes:
    """The 4-byte key ID of an RFC 6962 note signature (c2sp.org/static-ct-api)."""
    return hashlib.sha256(key_name.encode() + b"\n" + bytes([NOTE_SIGNATURE_RFC6962])
                          + log_id).digest()[:4]


def signed_checkpoint(origin: str, tree_size: int, root: bytes, timestamp: int,
                      tree_head_signature: bytes, log_id: bytes) -> str:
    """A checkpoint signed with the ``RFC6962NoteSignature`` of its tree head."""
    body = checkpoint_body(origin, tree_size, root)
    sig = note_key_id(origin, log_id) + struct.pack(">Q", timestamp) + tree_head_signature
    return f"{body}\n\u2014 {origin} {base64.b64encode(sig).decode()}\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    origin: str
    tree_size: int
    root: bytes
    timestamp: int
    tree_head_signature: bytes


def verify_checkpoint(note: str, origin: str, public_key: Any) -> Checkpoint:
    """Parse a checkpoint and verify the log's RFC 6962 note signature on it.

    Signatures by other keys are ignored, as signed-note requires.

    :raises SignatureError: no valid signature by the log.
    :raises StructureError: the note is not a checkpoint.
    """
    if "\n\n" not in note or not note.endswith("\n"):
        raise StructureError("checkpoint: no blank line before the signatures")
    split = note.rindex("\n\n")
    text, signatures = note[:split + 1], note[split + 2:]
    lines = text.split("\n")
    if len(lines) < 4 or not lines[1].isdigit():
        raise StructureError("checkpoint: expected origin, tree size and root hash lines")
    if lines[0] != origin:
        raise SignatureError(f"checkpoint: origin {lines[0]!r} is not {origin!r}")
    size = int(lines[1])
    root = base64.b64decode(lines[2], validate=True)
    key_id = note_key_id(origin, log_id_of(public_key))
    for line in signatures.splitlines():
        if not line.startswith("\u2014 "):
            raise StructureError("checkpoint: a signature line must start with an em dash")
        name, _, b64 = line[2:].partition(" ")
        raw = base64.b64decode(b64, validate=True)
        if name != origin or raw[:4] != key_id:
            continue
        if len(raw) < 12:
            raise StructureError("checkpoint: RFC 6962 note signature too short")
        timestamp = int.from_bytes(raw[4:12], "big")
        verify_tree_head(public_key, timestamp, size, root, raw[12:])
        return Checkpoint(origin=origin, tree_size=size, root=root, timestamp=timestamp,
                          tree_head_signature=raw[12:])
    raise SignatureError("checkpoint: no signature by the log's key")


# --- keys and signatures ---------------------------------------------------------------------


def log_id_of(public_key: Any) -> bytes:
    """The RFC 6962 ``LogID``: SHA-256 of the log's DER SubjectPublicKeyInfo.

    Kept per key object (the same few log keys check every SCT; keys are not hashable).
    """
    kept = _log_ids.get(id(public_key))
    if kept is not None and kept[0] is public_key:
        return kept[1]
    log_id = hashlib.sha256(public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()
    if len(_log_ids) >= _LOG_IDS_KEPT:
        _log_ids.clear()
    _log_ids[id(public_key)] = (public_key, log_id)  # holds the key: its id is not reused
    return log_id


_LOG_IDS_KEPT = 64
_log_ids: dict[int, tuple[Any, bytes]] = {}
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


@functools.lru_cache(maxsize=64)
def issuer_key_hash(issuer: x509.Certificate) -> bytes:
    """SHA-256 of the issuer's DER SubjectPublicKeyInfo (a precertificate entry's
    ``issuer_key_hash``); kept per issuer, which every precertificate repeats."""
    return hashlib.sha256(issuer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()


def _verify(public_key: Any, digitally: bytes, data: bytes, what: str) -> None:
    try:
        der = parse_digitally_signed(digitally)
    except StructureError as exc:
        raise SignatureError(f"{what}: {exc}") from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise SignatureError(f"{what}: the log key is not an ECDSA key")
    try:
        public_key.verify(der, data, _ECDSA_SHA256)
    except (InvalidSignature, ValueError):
        raise SignatureError(f"{what}: the signature does not verify") from None


def verify_sct(sct: SignedCertificateTimestamp, public_key: Any, entry_type: int,
               signed_entry: bytes) -> None:
    """Check ``sct`` for an entry (see :meth:`TimestampedEntry.signed_entry`).

    :raises SignatureError: wrong log, or the signature does not verify.
    """
    if sct.log_id != log_id_of(public_key):
        raise SignatureError("SCT: issued by another log (log id mismatch)")
    _verify(public_key, sct.signature,
            sct_signed_data(sct.timestamp, entry_type, signed_entry, sct.extensions), "SCT")


def verify_tree_head(public_key: Any, timestamp: int, tree_size: int, root: bytes,
                     signature: bytes) -> None:
    """Check an STH's ``tree_head_signature``.

    :raises SignatureError: it does not verify.
    """
    _verify(public_key, signature, tree_head_signed_data(timestamp, tree_size, root),
            "tree head")


def precert_entry_of_certificate(cert: x509.Certificate, issuer: x509.Certificate, *,
                                 tbs: bytes | None = None) -> TimestampedEntry:
    """The precert entry (timestamp and extensions empty) behind a certificate with
    embedded SCTs: the issuer's key hash and the TBS without the SCT list.

    :param tbs: ``cert.tbs_precertificate_bytes``, if the caller holds it already (it
        compared it with its precertificate's): not rebuilt then.
    """
    return TimestampedEntry(timestamp=0, entry_type=PRECERT_ENTRY,
                            issuer_key_hash=issuer_key_hash(issuer),
                            tbs_certificate=cert.tbs_precertificate_bytes if tbs is None
                            else tbs)


def verify_embedded_sct(cert: x509.Certificate, issuer: x509.Certificate,
                        sct: SignedCertificateTimestamp, public_key: Any, *,
                        tbs: bytes | None = None) -> TimestampedEntry:
    """Check one embedded SCT; return the log entry it promises (with its timestamp
    and extensions), whose Merkle leaf an inclusion proof can then check.

    :param tbs: see :func:`precert_entry_of_certificate`.
    :raises SignatureError: it does not verify.
    """
    entry = precert_entry_of_certificate(cert, issuer, tbs=tbs)
    verify_sct(sct, public_key, PRECERT_ENTRY, entry.signed_entry())
    return TimestampedEntry(timestamp=sct.timestamp, entry_type=PRECERT_ENTRY,
                            issuer_key_hash=entry.issuer_key_hash,
                            tbs_certificate=entry.tbs_certificate, extensions=sct.extensions)


# --- DER: the precertificate's TBS without the poison, the certificate with SCTs ---------


def der_tlv(tag: int, content: bytes) -> bytes:
    """One DER element: ``tag`` (one octet), the definite length, ``content``."""
    n = len(content)
    if n < 0x80:
        head = bytes([n])
    else:
        size = (n.bit_length() + 7) // 8
        head = bytes([0x80 | size]) + n.to_bytes(size, "big")
    return bytes([tag]) + head + content


def der_read(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """(tag, content, next position) of the DER item at ``pos``."""
    tag, start, end = _der_span(data, pos, len(data))
    return tag, data[start:end], end


_POISON_OID_DER = der_tlv(0x06, bytes.fromhex("2b06010401d679020403"))


def _der_span(data: bytes, pos: int, limit: int) -> tuple[int, int, int]:
    """(tag, start of the content, end) of the DER item at ``pos``, which must end by
    ``limit``: :func:`der_read` without copying the content."""
    if pos + 2 > limit:
        raise StructureError("DER: truncated")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise StructureError("DER: multi-byte tags are not expected here")
    first = data[pos + 1]
    pos += 2
    if first >= 0x80:
        size = first & 0x7F
        if size == 0 or size > 4 or pos + size > limit:
            raise StructureError("DER: bad length")
        first = int.from_bytes(data[pos:pos + size], "big")
        pos += size
    end = pos + first
    if end > limit:
        raise StructureError("DER: truncated")
    return tag, pos, end


@functools.lru_cache(maxsize=1024)
def precert_tbs(precertificate_der: bytes) -> bytes:
    """The TBSCertificate of a precertificate with its poison extension removed,
    re-encoded in DER: the ``tbs_certificate`` of a precert entry (RFC 6962 §3.2).
    Kept for recent ones: every validator needs it when the precertificate is logged
    and again when its certificate is checked against it. Every validator computes it
    for every issuance: it walks the items by their positions and copies each kept
    one once.

    :raises StructureError: not a certificate, or no critical poison extension.
    """
    return _poison_replaced(precertificate_der, b"")[0]


_SCT_LIST_OID_DER = der_tlv(0x06, bytes.fromhex("2b06010401d679020402"))
MAX_SCT_LIST = 2048
"""Octets of an SCT list a ``certificate`` decision may carry (a dozen SCTs)."""


def sct_list_extension(sct_list: bytes) -> bytes:
    """The encoded Extension embedding ``sct_list`` (a TLS-encoded
    ``SignedCertificateTimestampList``, RFC 6962 §3.3): not critical, its extnValue the
    DER OCTET STRING of the list (:func:`sct_list_extension_value`)."""
    return der_tlv(0x30, _SCT_LIST_OID_DER + der_tlv(0x04, der_tlv(0x04, sct_list)))


def certificate_tbs(precertificate_der: bytes, sct_list: bytes) -> bytes:
    """The final certificate's TBSCertificate: the precertificate's with the SCT list
    extension of ``sct_list`` in the poison's place. The issuer signs exactly this and
    every validator rebuilds it from the committed precertificate, so a ``certificate``
    decision need carry only the SCT list and the signature.

    :raises StructureError: see :func:`certificate_parts`.
    """
    return certificate_parts(precertificate_der, sct_list)[0]


def certificate_of(precertificate_der: bytes, sct_list: bytes, signature: bytes) -> bytes:
    """The final certificate's DER: :func:`certificate_tbs` signed with ``signature``
    (:func:`certificate_der`), byte for byte what the issuer made.

    :raises StructureError: see :func:`certificate_parts`.
    """
    return certificate_der(*certificate_parts(precertificate_der, sct_list), signature)


@functools.lru_cache(maxsize=1024)
def certificate_parts(precertificate_der: bytes, sct_list: bytes) -> tuple[bytes, bytes]:
    """(:func:`certificate_tbs`, the precertificate's encoded signatureAlgorithm): what
    :func:`certificate_der` puts around a signature. Kept for recent ones: a validator
    assembles a certificate when it reads a block ahead (for its fingerprint) and again
    when it checks the signature.

    :raises StructureError: not a precertificate, or ``sct_list`` not a list of v1
        SCTs (:func:`check_sct_list`) of at most :data:`MAX_SCT_LIST` octets.
    """
    if len(sct_list) > MAX_SCT_LIST:
        raise StructureError(f"SignedCertificateTimestampList: longer than {MAX_SCT_LIST} "
                             "octets")
    check_sct_list(sct_list)
    der = precertificate_der
    tbs, tbs_end = _poison_replaced(der, sct_list_extension(sct_list))
    tag, _, algorithm_end = _der_span(der, tbs_end, len(der))
    if tag != 0x30:
        raise StructureError("precertificate: no signatureAlgorithm")
    return tbs, der[tbs_end:algorithm_end]


def certificate_der(tbs: bytes, algorithm: bytes, signature: bytes) -> bytes:
    """``Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }``
    of an encoded TBS and AlgorithmIdentifier, ``signature`` the BIT STRING's octets."""
    return der_tlv(0x30, tbs + algorithm + der_tlv(0x03, b"\x00" + signature))


def _poison_replaced(der: bytes, extension: bytes) -> tuple[bytes, int]:
    """The TBSCertificate of the precertificate ``der`` with its poison extension
    replaced by the encoded ``extension`` (b"": removed), and where the TBS ends in
    ``der``. Walks the items by their positions and copies each kept one once.

    :raises StructureError: not a certificate, or no critical poison extension.
    """
    tag, start, end = _der_span(der, 0, len(der))
    if tag != 0x30 or end != len(der):
        raise StructureError("precertificate: not one DER SEQUENCE")
    tag, pos, tbs_end = _der_span(der, start, end)
    if tag != 0x30:
        raise StructureError("precertificate: no TBSCertificate")
    found = False
    out = []
    while pos < tbs_end:
        item = pos
        tag, content, pos = _der_span(der, pos, tbs_end)
        if tag != 0xA3:
            out.append(der[item:pos])
            continue
        seq_tag, epos, exts_end = _der_span(der, content, pos)
        kept = []
        while epos < exts_end:
            ext = epos
            _, ext_content, epos = _der_span(der, epos, exts_end)
            if der.startswith(_POISON_OID_DER, ext_content) \
                    and ext_content + len(_POISON_OID_DER) <= epos:
                found = True
                if extension:
                    kept.append(extension)
                continue
            kept.append(der[ext:epos])
        if kept:
            out.append(der_tlv(0xA3, der_tlv(seq_tag, b"".join(kept))))
    if not found:
        raise StructureError("precertificate: no poison extension")
    return der_tlv(0x30, b"".join(out)), tbs_end
