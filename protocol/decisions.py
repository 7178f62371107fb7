"""The decisions a block carries, as typed values: what the validators agree to do.

On the wire a decision is sealed by the validator that made it (its *entry*):
``{"body": bstr, "entry": validator-id, "signature": Ed25519 over the body}``, or
the same with a ``batch`` inclusion path when one signature covers many
(:mod:`handlers.consensus._sealed`), ``body`` the deterministic CBOR of a map
whose ``kind`` says which of the classes below it is (spec/stoq.md §18.5).
:func:`parse` turns a body into one of them, refusing anything malformed with
:class:`DecisionError`; ``body()`` is the inverse. The checks that need keys,
proofs or the state are not here: :mod:`._rules` checks a decision before a
validator votes for it, and :mod:`._machine` executes it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, ClassVar

from ._cbor import decode_item, encode_deterministic
from .ct_structs import MAX_SCT_LIST

MAX_NAMES = 100
MAX_CHAIN = 10
MAX_KEYS = 64


class DecisionError(ValueError):
    """A decision that is malformed, unknown, or not sealed by an active validator."""


def _get(body: dict[str, Any], key: str, kind: type | tuple[type, ...], *,
         optional: bool = False) -> Any:
    value = body.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise DecisionError(f"{body.get('kind')}: {key} is missing or of the wrong type")
    return value


def _uint(body: dict[str, Any], key: str) -> int:
    value = _get(body, key, int)
    if value < 0:
        raise DecisionError(f"{body.get('kind')}: {key} is negative")
    return int(value)


def _bytes_list(body: dict[str, Any], key: str, limit: int) -> tuple[bytes, ...]:
    value = _get(body, key, list)
    if len(value) > limit or not all(isinstance(v, bytes) for v in value):
        raise DecisionError(f"{body.get('kind')}: {key} must be at most {limit} byte strings")
    return tuple(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Issue:
    """A client's certificate: its CSR, its four proofs, and the precertificate the entry
    validator signed (which fixes the serial, the validity and the issuer)."""

    KIND: ClassVar[str] = "issue"
    csr: bytes
    proofs: Any
    precertificate: bytes
    renews: str | None = None
    renewal_signature: bytes | None = None
    at_ms: int

    def body(self) -> dict[str, Any]:
        return {"kind": self.KIND, "csr": self.csr, "proofs": self.proofs,
                "precertificate": self.precertificate, "renews": self.renews,
                "renewal_signature": self.renewal_signature, "at_ms": self.at_ms}

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Issue:
        renews = _get(body, "renews", str, optional=True)
        signature = _get(body, "renewal_signature", bytes, optional=True)
        if (renews is None) != (signature is None):
            raise DecisionError("issue: renews and renewal_signature go together")
        return cls(csr=_get(body, "csr", bytes), proofs=body.get("proofs"),
                   precertificate=_get(body, "precertificate", bytes), renews=renews,
                   renewal_signature=signature, at_ms=_uint(body, "at_ms"))


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeCertificate:
    """A validator's own TLS certificate: names from the validator set, no client proofs."""

    KIND: ClassVar[str] = "node-certificate"
    csr: bytes
    precertificate: bytes
    at_ms: int

    def body(self) -> dict[str, Any]:
        return {"kind": self.KIND, "csr": self.csr, "precertificate": self.precertificate,
                "at_ms": self.at_ms}

    @classmethod
    def parse(cls, body: dict[str, Any]) -> NodeCertificate:
        return cls(csr=_get(body, "csr", bytes),
                   precertificate=_get(body, "precertificate", bytes),
                   at_ms=_uint(body, "at_ms"))


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedCertificate:
    """The certificate of a committed issuance, signed by its issuing validator with the
    SCTs embedded, whole: the full form of the ``certificate`` kind, which earlier
    versions made (:class:`CompactCertificate` is what this one makes). Any validator
    may seal it: it proves itself."""

    KIND: ClassVar[str] = "certificate"
    serial: str
    certificate: bytes
    at_ms: int

    def body(self) -> dict[str, Any]:
        return {"kind": self.KIND, "serial": self.serial, "certificate": self.certificate,
                "at_ms": self.at_ms}

    @classmethod
    def parse(cls, body: dict[str, Any]) -> SignedCertificate:
        if "sct_list" in body or "signature" in body:
            raise DecisionError("certificate: either certificate, or sct_list and signature")
        return cls(serial=_get(body, "serial", str), certificate=_get(body, "certificate", bytes),
                   at_ms=_uint(body, "at_ms"))


MAX_SERIAL = 40
"""Characters of a serial number in a compact ``certificate`` decision."""
MAX_SIGNATURE = 256
"""Octets of its signature (ECDSA P-256 makes at most 72, Ed25519 64)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CompactCertificate:
    """The certificate of a committed issuance by what is new in it: the SCT list and
    the issuing validator's signature. The rest is the committed precertificate, so
    every validator assembles the same DER (:func:`protocol.ct_structs.certificate_of`).
    The ``certificate`` kind in its compact form; :class:`SignedCertificate` is the
    full form, still accepted (blocks of earlier versions)."""

    KIND: ClassVar[str] = "certificate"
    serial: str
    sct_list: bytes
    """The TLS-encoded ``SignedCertificateTimestampList`` (RFC 6962 §3.3)."""
    signature: bytes
    """The certificate's signatureValue octets."""
    at_ms: int

    def body(self) -> dict[str, Any]:
        return {"kind": self.KIND, "serial": self.serial, "sct_list": self.sct_list,
                "signature": self.signature, "at_ms": self.at_ms}

    @classmethod
    def parse(cls, body: dict[str, Any]) -> CompactCertificate:
        serial, sct_list, signature = (_get(body, "serial", str), _get(body, "sct_list", bytes),
                                       _get(body, "signature", bytes))
        if not 0 < len(serial) <= MAX_SERIAL:
            raise DecisionError(f"certificate: serial must be 1 to {MAX_SERIAL} characters")
        if not 0 < len(sct_list) <= MAX_SCT_LIST:
            raise DecisionError(f"certificate: sct_list must be 1 to {MAX_SCT_LIST} octets")
        if not 0 < len(signature) <= MAX_SIGNATURE:
            raise DecisionError(f"certificate: signature must be 1 to {MAX_SIGNATURE} octets")
        return cls(serial=serial, sct_list=sct_list, signature=signature,
                   at_ms=_uint(body, "at_ms"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Revoke:
    """A revocation, with the holder's (or an administrator's) signed statement."""

    KIND: ClassVar[str] = "revoke"
    serial: str
    reason: str
    time: int
    signature: bytes
    admin_certificate: bytes | None
    proofs: Any
    at_ms: int

    def body(self) -> dict[str, Any]:
        return {"kind": self.KIND, "serial": self.serial, "reason": self.reason,
                "time": self.time, "signature": self.signature,
                "admin_certificate": self.admin_certificate, "proofs": self.proofs,
                "at_ms": self.at_ms}

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Revoke:
        return cls(serial=_get(body, "serial", str), reason=_get(body, "reason", str),
                   time=_uint(body, "time"), signature=_get(body, "signature", bytes),
                   admin_certificate=_get(body, "admin_certificate", bytes, optional=True),
                   proofs=body.get("proofs"), at_ms=_uint(body, "at_ms"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Register:
    """AAAA records a certificate holder publishes for one of its names (``dns.register``)."""

    KIND: ClassVar[str] = "register"
    serial: str
    name: str
    addresses: tuple[str, ...]
    time: int
    signature: bytes
    at_ms: int

    def body(self) -> dict[str, Any]:
        return {"kind": self.KIND, "serial": self.serial, "name": self.name,
                "addresses": list(self.addresses), "time": self.time,
                "signature": self.signature, "at_ms": self.at_ms}

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Register:
        addresses = _get(body, "addresses", list)
        if len(addresses) > 16 or not all(isinstance(a, str) for a in addresses):
            raise DecisionError("register: at most 16 addresses (text)")
        for address in addresses:
            try:
                canonical = ipaddress.IPv6Address(address).compressed
            except ValueError:
                canonical = None
            if canonical != address:
                raise DecisionError(f"register: {address[:64]!r} is not an IPv6 address in "
                                    "compressed form")
        return cls(serial=_get(body, "serial", str), name=_get(body, "name", str),
                   addresses=tuple(addresses), time=_uint(body, "time"),
                   signature=_get(body, "signature", bytes), at_ms=_uint(body, "at_ms"))


@dataclass(frozen=True, slots=True, kw_only=True)
class LogChain:
    """A chain submitted to the CT log (``ct.add-chain``, ``ct.add-pre-chain``)."""

    KIND: ClassVar[str] = "log"
    chain: tuple[bytes, ...]
    precert: bool
    at_ms: int

    def body(self) -> dict[str, Any]:
        return {"kind": self.KIND, "chain": list(self.chain), "precert": self.precert,
                "at_ms": self.at_ms}

    @classmethod
    def parse(cls, body: dict[str, Any]) -> LogChain:
        precert = body.get("precert")
        if not isinstance(precert, bool):
            raise DecisionError("log: precert must be true or false")
        return cls(chain=_bytes_list(body, "chain", MAX_CHAIN), precert=precert,
                   at_ms=_uint(body, "at_ms"))


@dataclass(frozen=True, slots=True, kw_only=True)
class ValidatorKeys:
    """What a validator signs with, announced to all: its issuing intermediates (the
    active one last), its CT log key per shard, its DNSSEC keys, its administrators."""

    KIND: ClassVar[str] = "keys"
    intermediates: tuple[bytes, ...]
    ct_logs: tuple[tuple[int, bytes], ...]
    dnskeys: tuple[bytes, ...]
    admins: tuple[bytes, ...]
    at_ms: int

    def body(self) -> dict[str, Any]:
        return {"kind": self.KIND, "intermediates": list(self.intermediates),
                "ct_logs": [[s, k] for s, k in self.ct_logs], "dnskeys": list(self.dnskeys),
                "admins": list(self.admins), "at_ms": self.at_ms}

    def announced(self) -> bytes:
        """What the state keeps for the validator (the body without its time)."""
        body = self.body()
        del body["at_ms"]
        return encode_deterministic(body)

    @classmethod
    def parse(cls, body: dict[str, Any]) -> ValidatorKeys:
        logs = _get(body, "ct_logs", list)
        if len(logs) > MAX_KEYS or not all(
                isinstance(e, list) and len(e) == 2 and isinstance(e[0], int)
                and not isinstance(e[0], bool) and e[0] >= 0 and isinstance(e[1], bytes)
                for e in logs):
            raise DecisionError("keys: ct_logs must be [shard, key] pairs")
        intermediates = _bytes_list(body, "intermediates", MAX_KEYS)
        if not intermediates:
            raise DecisionError("keys: at least one intermediate")
        return cls(intermediates=intermediates, ct_logs=tuple((int(s), k) for s, k in logs),
                   dnskeys=_bytes_list(body, "dnskeys", MAX_KEYS),
                   admins=_bytes_list(body, "admins", MAX_KEYS), at_ms=_uint(body, "at_ms"))

    @classmethod
    def from_announced(cls, data: bytes) -> ValidatorKeys:
        body = decode_item(data)
        if not isinstance(body, dict):
            raise DecisionError("stored validator keys are not a map")
        return cls.parse({**body, "at_ms": 0})


@dataclass(frozen=True, slots=True, kw_only=True)
class Misissued:
    """Evidence: a certificate signed by a validator's intermediate that no committed
    decision allows. It proves itself; the signer is isolated."""

    KIND: ClassVar[str] = "misissued"
    certificate: bytes
    at_ms: int

    def body(self) -> dict[str, Any]:
        return {"kind": self.KIND, "certificate": self.certificate, "at_ms": self.at_ms}

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Misissued:
        return cls(certificate=_get(body, "certificate", bytes), at_ms=_uint(body, "at_ms"))


@dataclass(frozen=True, slots=True, kw_only=True)
class StakeCredit:
    """A development faucet credit (exactly the minimum stake)."""

    KIND: ClassVar[str] = "stake"
    key_id: str
    amount: int
    reason: str
    at_ms: int

    def body(self) -> dict[str, Any]:
        return {"kind": self.KIND, "key_id": self.key_id, "amount": self.amount,
                "reason": self.reason, "at_ms": self.at_ms}

    @classmethod
    def parse(cls, body: dict[str, Any]) -> StakeCredit:
        key_id = _get(body, "key_id", str)
        if len(key_id) != 64:
            raise DecisionError("stake: key_id is a SHA-256 in hex")
        return cls(key_id=key_id, amount=_uint(body, "amount"), reason=_get(body, "reason", str),
                   at_ms=_uint(body, "at_ms"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """A validator's CT checkpoint, which every precommitting validator cosigns."""

    KIND: ClassVar[str] = "checkpoint"
    origin: str
    size: int
    root: bytes
    note: str
    at_ms: int

    def body(self) -> dict[str, Any]:
        return {"kind": self.KIND, "origin": self.origin, "size": self.size, "root": self.root,
                "note": self.note, "at_ms": self.at_ms}

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Checkpoint:
        origin, root, note = (_get(body, "origin", str), _get(body, "root", bytes),
                              _get(body, "note", str))
        if not (0 < len(origin) <= 256 and len(root) == 32 and len(note) <= 8192):
            raise DecisionError("checkpoint: origin, size, root and note are required")
        return cls(origin=origin, size=_uint(body, "size"), root=root, note=note,
                   at_ms=_uint(body, "at_ms"))


Decision = (Issue | NodeCertificate | SignedCertificate | CompactCertificate | Revoke
            | Register | LogChain | ValidatorKeys | Misissued | StakeCredit | Checkpoint)

KINDS: dict[str, Any] = {cls.KIND: cls for cls in (
    Issue, NodeCertificate, SignedCertificate, Revoke, Register, LogChain, ValidatorKeys,
    Misissued, StakeCredit, Checkpoint)}


def parse(body: Any) -> Decision:
    """The typed decision of a decoded body.

    :raises DecisionError: not a map, an unknown kind, or a malformed field.
    """
    if not isinstance(body, dict):
        raise DecisionError("a decision body is a map")
    kind = KINDS.get(body.get("kind"))  # type: ignore[arg-type]
    if kind is None:
        raise DecisionError(f"unknown decision kind {body.get('kind')!r}")
    if kind is SignedCertificate and "certificate" not in body:
        kind = CompactCertificate  # the same kind, in its compact form
    decision: Decision = kind.parse(body)
    return decision
