"""``consensus.*`` ops and the four-proof set that admits every CA operation.

Everything here is sans-I/O and shared by the server (which verifies) and the
client library (which builds): the wire shape of ``proofs``, the statements
that are hashed or signed (deterministic CBOR, RFC 8949 §4.2.1), and the
derivations that bind each proof to the requester's key, the epoch beacon and
the request. The cryptography that needs native code (chiapos, chiavdf) lives
in ``handlers.consensus`` and ``stoq._prover``; spec/stoq.md §17 is the
reference for a client in another language.

A proof set on the wire (the ``proofs`` argument of ``ca.issue`` and
``ca.revoke``)::

    {"epoch": uint, "requester_key": SPKI DER,
     "space": {"plot_id": bstr32, "k": uint, "index": uint, "proof": bstr},
     "time": {"iterations": uint, "output": bstr100, "proof": bstr100},
     "work": {"nonce": bstr1..32},
     "binding": signature}
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from dataclasses import dataclass
from typing import Any, Literal

from .._cbor import decode_item, encode_deterministic, encode_head, encode_item
from .._errors import InvalidRequest, MalformedFrame, ProofInvalid
from .._schema import OpSpec, arg, register

ProofName = Literal["space", "stake", "work", "time", "binding"]
"""The ``proof`` detail of a ``proof_invalid`` error."""

Operation = Literal["issue", "revoke"]
"""The CA operations a proof set can admit."""

SPACE_CHALLENGES = 32
"""Challenge indices a requester may try (0 to 31): about 36 % of chiapos
challenges have no proof in a plot, so a whole plot fails all 32 with
probability 0.36^32, about 6e-15; the bound limits grinding."""
MIN_PLOT_SIZE = 18
"""Smallest plot size ``k`` chiapos creates."""
MAX_PLOT_SIZE = 50
"""Largest plot size ``k`` chiapos verifies."""
VDF_DISCRIMINANT_BITS = 1024
"""Size of the class-group discriminant (chiavdf's maximum, Chia's value)."""
VDF_FORM_SIZE = 100
"""Bytes of a compressed class-group form (chiavdf ``BQFC_FORM_SIZE``)."""
VDF_GENERATOR = b"\x08" + bytes(VDF_FORM_SIZE - 1)
"""The initial form of every VDF: the generator (2, 1) in chiavdf's encoding."""
MAX_VDF_ITERATIONS = 1 << 40
"""Iteration counts above this are refused as absurd (about three years here)."""
MAX_NONCE_SIZE = 32
MAX_KEY_SIZE = 1024
MAX_SIGNATURE_SIZE = 512
KEY_ID_SIZE = 32

_CTX_PLOT = "trustchain-plot-v1"
_CTX_SPACE = "trustchain-space-challenge-v1"
_CTX_VDF = "trustchain-vdf-v1"
_CTX_WORK = "trustchain-work-v1"
_CTX_BINDING = "trustchain-proofs-v1"
_CTX_BEACON = "trustchain-beacon-v1"


# --- ops ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class BeaconArgs:
    epoch: int | None = arg(None, minimum=0, maximum=(1 << 63) - 1,
                            doc="a past epoch's beacon; null: the current epoch")


@dataclass(frozen=True, slots=True, kw_only=True)
class StakeArgs:
    key: bytes = arg(max_length=MAX_KEY_SIZE, doc="the requester's public key, DER SPKI")


@dataclass(frozen=True, slots=True, kw_only=True)
class FaucetArgs:
    key: bytes = arg(max_length=MAX_KEY_SIZE, doc="the requester's public key, DER SPKI")


BEACON = register(OpSpec(name="consensus.beacon", args=BeaconArgs,
                         summary="the epoch beacon and the proof parameters"))
STAKE = register(OpSpec(name="consensus.stake", args=StakeArgs,
                        summary="a key's stake in the ledger"))
FAUCET = register(OpSpec(name="consensus.faucet", args=FaucetArgs,
                         summary="development only: top a key's stake up to the minimum"))


MAX_GOSSIP_MESSAGES = 512
"""Consensus messages one ``consensus.gossip`` request may carry."""
MAX_BLOCKS_PER_REQUEST = 256


PACK_AT_BYTES = 1024
"""A sender packs a request whose messages add up to at least this many bytes."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GossipArgs:
    messages: list[bytes] = arg([], max_length=MAX_GOSSIP_MESSAGES,
                                doc="deterministic-CBOR consensus messages (spec §18.3)")
    packed: bytes | None = arg(None, doc="instead of messages: the zlib stream of their CBOR "
                                         "array (spec §18.3)")
    sender: str | None = arg(None, max_length=40, doc="the sending validator's id")
    link: bytes | None = arg(None, max_length=64,
                             doc="the sender's link statement over this endpoint's TLS key "
                                 "(spec §18.2)")


def pack_messages(messages: list[bytes]) -> bytes:
    """``packed`` for ``consensus.gossip``: the messages' CBOR array, zlib-compressed.

    Sealed decisions repeat most of their bytes (issuer names, extensions,
    proof parameters, batch paths): a batch shrinks to about a quarter, and a
    4-validator cluster sent about 40 % fewer datagrams per issuance for a little
    less CPU overall than unpacked (zlib level 1; bench/README.md).
    """
    return zlib.compress(encode_item(messages), 1)


def unpack_messages(packed: bytes, max_bytes: int) -> list[bytes]:
    """The messages of a ``packed`` gossip request, inflated to at most ``max_bytes``.

    :raises InvalidRequest: not a zlib stream of one CBOR array of at most
        :data:`MAX_GOSSIP_MESSAGES` byte strings within ``max_bytes``.
    """
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(packed, max_bytes)
    except zlib.error as exc:
        raise InvalidRequest(f"packed is not a zlib stream: {exc}", field="packed") from None
    if inflater.unconsumed_tail:
        raise InvalidRequest(f"packed inflates to more than {max_bytes} bytes", field="packed")
    if not inflater.eof or inflater.unused_data:
        raise InvalidRequest("packed is not exactly one complete zlib stream", field="packed")
    try:
        messages = decode_item(raw)
    except MalformedFrame as exc:
        raise InvalidRequest(f"packed does not hold CBOR: {exc}", field="packed") from None
    if not (isinstance(messages, list) and len(messages) <= MAX_GOSSIP_MESSAGES
            and all(type(m) is bytes for m in messages)):
        raise InvalidRequest(f"packed does not hold an array of at most "
                             f"{MAX_GOSSIP_MESSAGES} byte strings", field="packed")
    return messages


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentityArgs:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class BlocksArgs:
    start: int = arg(minimum=1, maximum=(1 << 63) - 1, doc="first height")
    limit: int = arg(64, minimum=1, maximum=MAX_BLOCKS_PER_REQUEST)


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusArgs:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointArgs:
    origin: str | None = arg(None, max_length=256,
                             doc="a CT log origin; null: every origin the chain has")


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckCertificateArgs:
    certificate: bytes = arg(max_length=65536, doc="a DER certificate to check against the chain")


@dataclass(frozen=True, slots=True, kw_only=True)
class ValidatorsArgs:
    height: int | None = arg(None, minimum=1, maximum=(1 << 63) - 1,
                             doc="the height whose deciding set to give; null: the height "
                                 "being decided now")


GOSSIP = register(OpSpec(name="consensus.gossip", args=GossipArgs,
                         summary="validators only: proposals, votes, evidence, decisions"))
IDENTITY = register(OpSpec(name="consensus.identity", args=IdentityArgs,
                           summary="the validator behind this endpoint, bound to its TLS key"))
BLOCKS = register(OpSpec(name="consensus.blocks", args=BlocksArgs,
                         summary="decided blocks with their commit certificates"))
STATUS = register(OpSpec(name="consensus.status", args=StatusArgs,
                         summary="height, round, validators, peers, evidence, isolation"))
CHECKPOINT = register(OpSpec(name="consensus.checkpoint", args=CheckpointArgs,
                             summary="CT checkpoints committed with validator cosignatures"))
VALIDATORS = register(OpSpec(name="consensus.validators", args=ValidatorsArgs,
                             summary="the validator set (keys, powers) that decides a height"))
CHECK_CERTIFICATE = register(OpSpec(
    name="consensus.check-certificate", args=CheckCertificateArgs,
    summary="was this certificate issued as a committed block fixed it?"))


# --- parameters ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ProofParams:
    """What a node requires of a proof set; ``consensus.beacon`` publishes it."""

    minimum_stake: int
    """Stake the requester key must hold."""
    minimum_work_difficulty: int
    """Leading zero bits the work hash must have (0 to 64)."""
    plot_size: int
    """Smallest plot size ``k`` accepted."""
    vdf_iterations: int
    """Smallest VDF iteration count accepted."""
    epoch_length: int
    """Seconds per epoch; epoch ``e`` starts at ``e * epoch_length`` (Unix time)."""
    space_challenges: int = SPACE_CHALLENGES
    vdf_discriminant_bits: int = VDF_DISCRIMINANT_BITS

    def to_wire(self) -> dict[str, Any]:
        return {"minimum_stake": self.minimum_stake,
                "minimum_work_difficulty": self.minimum_work_difficulty,
                "plot_size": self.plot_size, "space_challenges": self.space_challenges,
                "vdf_iterations": self.vdf_iterations,
                "vdf_discriminant_bits": self.vdf_discriminant_bits,
                "epoch_length": self.epoch_length}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> ProofParams:
        """:raises KeyError, TypeError: ``raw`` is not a ``proof-params`` map."""
        values = {name: raw[name] for name in (
            "minimum_stake", "minimum_work_difficulty", "plot_size", "space_challenges",
            "vdf_iterations", "vdf_discriminant_bits", "epoch_length")}
        if any(type(v) is not int for v in values.values()):
            raise TypeError("proof parameters must be integers")
        return cls(**values)


# --- the proof set --------------------------------------------------------------------


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class SpaceProof:
    """A chiapos proof of space for this epoch's challenge, from a plot bound to the key."""

    plot_id: bytes
    k: int
    index: int
    """Which challenge of the epoch (0 to ``SPACE_CHALLENGES - 1``)."""
    proof: bytes
    """The 64 x-values, ``8 * k`` bytes."""

    def to_wire(self) -> dict[str, Any]:
        return {"plot_id": self.plot_id, "k": self.k, "index": self.index, "proof": self.proof}

    def digest(self) -> bytes:
        """SHA-256 of the deterministic encoding of :meth:`to_wire`: what the binding signs."""
        return _credential_digest(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeProof:
    """A Wesolowski VDF (chiavdf) on the requester's discriminant for this epoch."""

    iterations: int
    output: bytes
    """The form ``y = g^(2^iterations)``, compressed (100 bytes)."""
    proof: bytes
    """The Wesolowski proof ``pi``, compressed (100 bytes)."""

    def to_wire(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "output": self.output, "proof": self.proof}

    def digest(self) -> bytes:
        return _credential_digest(self)


@functools.lru_cache(maxsize=1024)
def _credential_digest(proof: SpaceProof | TimeProof) -> bytes:
    """The digest of an epoch credential, which its requester sends with every request of
    the epoch: computed once per credential while it is in use."""
    return _sha256(encode_deterministic(proof.to_wire()))


@dataclass(frozen=True, slots=True, kw_only=True)
class ProofSet:
    """The four proofs and the binding signature of one request."""

    epoch: int
    requester_key: bytes
    """DER SubjectPublicKeyInfo of the key that holds the stake and signs the binding."""
    space: SpaceProof
    time: TimeProof
    nonce: bytes
    """The proof of work: makes the work hash reach the difficulty."""
    binding: bytes
    """The requester key's signature over :func:`binding_statement`."""

    @property
    def key_id(self) -> bytes:
        return key_id(self.requester_key)

    def to_wire(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "requester_key": self.requester_key,
                "space": self.space.to_wire(), "time": self.time.to_wire(),
                "work": {"nonce": self.nonce}, "binding": self.binding}


def _fail(proof: ProofName, field: str, message: str) -> ProofInvalid:
    return ProofInvalid(f"{proof}: {message}", proof=proof, field=f"proofs.{field}")


def _map(raw: Any, proof: ProofName, field: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if raw is None:
        raise _fail(proof, field, f"proofs.{field} is missing")
    if type(raw) is not dict:
        raise _fail(proof, field, f"proofs.{field} must be a map")
    for key in raw:
        if key not in keys:
            raise _fail(proof, f"{field}.{key}" if isinstance(key, str) else field,
                        f"proofs.{field} has an unknown key {key!r}")
    return raw


def _uint(raw: dict[str, Any], key: str, proof: ProofName, field: str,
          lo: int, hi: int, what: str = "") -> int:
    value = raw.get(key)
    where = f"{field}.{key}" if field else key
    if value is None:
        raise _fail(proof, where, f"proofs.{where} is missing")
    if type(value) is not int:
        raise _fail(proof, where, f"proofs.{where} must be an integer")
    if not lo <= value <= hi:
        raise _fail(proof, where, f"proofs.{where} must be within {lo}..{hi}{what}, "
                                  f"not {value}")
    return value


def _bytes(raw: dict[str, Any], key: str, proof: ProofName, field: str,
           lo: int, hi: int) -> bytes:
    value = raw.get(key)
    where = f"{field}.{key}" if field else key
    if value is None:
        raise _fail(proof, where, f"proofs.{where} is missing")
    if type(value) is not bytes:
        raise _fail(proof, where, f"proofs.{where} must be a byte string")
    if not lo <= len(value) <= hi:
        size = f"{lo}" if lo == hi else f"{lo} to {hi}"
        raise _fail(proof, where, f"proofs.{where} must be {size} bytes long, "
                                  f"not {len(value)}")
    return value


_TOP_KEYS = ("epoch", "requester_key", "space", "time", "work", "binding")
_OWNER: dict[str, ProofName] = {"epoch": "time", "requester_key": "stake", "space": "space",
                                "time": "time", "work": "work", "binding": "binding"}


def parse_proofs(raw: Any) -> ProofSet:
    """Check the shape of a received ``proofs`` argument and build the :class:`ProofSet`.

    Only shapes and sizes are checked here; the proofs themselves are verified
    by the node. Each failure names the proof the offending part belongs to
    (``epoch`` belongs to ``time``, ``requester_key`` to ``stake``).

    :raises ProofInvalid: with ``proof`` and ``field`` (``proofs.space.k``, ...).
    """
    return _well_formed(raw) or _parse_each(raw)


_TOP_KEY_SET = frozenset(_TOP_KEYS)
_SPACE_KEYS = frozenset(("plot_id", "k", "index", "proof"))
_TIME_KEYS = frozenset(("iterations", "output", "proof"))
_WORK_KEYS = frozenset(("nonce",))


def _well_formed(raw: Any) -> ProofSet | None:
    """The :class:`ProofSet` of a set that passes every check of :func:`_parse_each`,
    tested in one expression (as every honest set does); None for any other, which
    :func:`_parse_each` then takes apart to say what is wrong."""
    if not (type(raw) is dict and raw.keys() == _TOP_KEY_SET):
        return None
    space, time, work = raw["space"], raw["time"], raw["work"]
    if not (type(space) is dict and space.keys() == _SPACE_KEYS and type(time) is dict
            and time.keys() == _TIME_KEYS and type(work) is dict and work.keys() == _WORK_KEYS):
        return None
    epoch, key, binding = raw["epoch"], raw["requester_key"], raw["binding"]
    k, index, plot_id, proof = space["k"], space["index"], space["plot_id"], space["proof"]
    iterations, output, vdf_proof = time["iterations"], time["output"], time["proof"]
    nonce = work["nonce"]
    if not (type(epoch) is int and 0 <= epoch <= (1 << 63) - 1
            and type(key) is bytes and 1 <= len(key) <= MAX_KEY_SIZE
            and type(k) is int and MIN_PLOT_SIZE <= k <= MAX_PLOT_SIZE
            and type(index) is int and 0 <= index <= SPACE_CHALLENGES - 1
            and type(plot_id) is bytes and len(plot_id) == 32
            and type(proof) is bytes and len(proof) == 8 * k
            and type(iterations) is int and 1 <= iterations <= MAX_VDF_ITERATIONS
            and type(output) is bytes and len(output) == VDF_FORM_SIZE
            and type(vdf_proof) is bytes and len(vdf_proof) == VDF_FORM_SIZE
            and type(nonce) is bytes and 1 <= len(nonce) <= MAX_NONCE_SIZE
            and type(binding) is bytes and 1 <= len(binding) <= MAX_SIGNATURE_SIZE):
        return None
    return ProofSet(epoch=epoch, requester_key=key,
                    space=SpaceProof(plot_id=plot_id, k=k, index=index, proof=proof),
                    time=TimeProof(iterations=iterations, output=output, proof=vdf_proof),
                    nonce=nonce, binding=binding)


def _parse_each(raw: Any) -> ProofSet:
    """:func:`parse_proofs`, a check at a time: the first failure is the error."""
    if raw is None:
        raise ProofInvalid("binding: this operation needs the four-proof set in 'proofs' "
                           "(space, stake, work, time and their binding)",
                           proof="binding", field="proofs")
    if type(raw) is not dict:
        raise ProofInvalid("binding: proofs must be a map", proof="binding", field="proofs")
    for key in raw:
        if key not in _TOP_KEYS:
            raise ProofInvalid(f"binding: proofs has an unknown key {key!r}", proof="binding",
                               field="proofs")
    for key in _TOP_KEYS:
        if key not in raw:
            raise _fail(_OWNER[key], key, f"proofs.{key} is missing")
    epoch = _uint(raw, "epoch", "time", "", 0, (1 << 63) - 1)
    requester_key = _bytes(raw, "requester_key", "stake", "", 1, MAX_KEY_SIZE)
    space = _map(raw["space"], "space", "space", ("plot_id", "k", "index", "proof"))
    k = _uint(space, "k", "space", "space", MIN_PLOT_SIZE, MAX_PLOT_SIZE)
    space_proof = SpaceProof(
        plot_id=_bytes(space, "plot_id", "space", "space", 32, 32), k=k,
        index=_uint(space, "index", "space", "space", 0, SPACE_CHALLENGES - 1),
        proof=_bytes(space, "proof", "space", "space", 8 * k, 8 * k))
    time = _map(raw["time"], "time", "time", ("iterations", "output", "proof"))
    time_proof = TimeProof(
        iterations=_uint(time, "iterations", "time", "time", 1, MAX_VDF_ITERATIONS),
        output=_bytes(time, "output", "time", "time", VDF_FORM_SIZE, VDF_FORM_SIZE),
        proof=_bytes(time, "proof", "time", "time", VDF_FORM_SIZE, VDF_FORM_SIZE))
    work = _map(raw["work"], "work", "work", ("nonce",))
    nonce = _bytes(work, "nonce", "work", "work", 1, MAX_NONCE_SIZE)
    binding = _bytes(raw, "binding", "binding", "", 1, MAX_SIGNATURE_SIZE)
    return ProofSet(epoch=epoch, requester_key=requester_key, space=space_proof,
                    time=time_proof, nonce=nonce, binding=binding)


# --- derivations ------------------------------------------------------------------------


def key_id(spki: bytes) -> bytes:
    """SHA-256 of a DER SubjectPublicKeyInfo: the key's account in the stake ledger."""
    return _sha256(spki)


def issue_digest(csr: bytes) -> bytes:
    """The request digest of ``ca.issue``: SHA-256 of the CSR's DER."""
    return _sha256(csr)


def revoke_digest(statement: bytes) -> bytes:
    """The request digest of ``ca.revoke``: SHA-256 of the revocation statement."""
    return _sha256(statement)


def plot_id_for(spki: bytes, k: int) -> bytes:
    """The only plot id a key may prove space with, for plots of size ``k``."""
    return _sha256(encode_deterministic({"ctx": _CTX_PLOT, "key": spki, "k": k}))


def space_challenge(beacon: bytes, plot_id: bytes, index: int) -> bytes:
    """The 32-byte chiapos challenge number ``index`` of a plot in an epoch."""
    return _sha256(encode_deterministic({"ctx": _CTX_SPACE, "beacon": beacon,
                                         "plot_id": plot_id, "index": index}))


def vdf_challenge(beacon: bytes, epoch: int, spki: bytes) -> bytes:
    """The seed of the requester's discriminant (``create_discriminant(seed, 1024)``)."""
    return _sha256(encode_deterministic({"ctx": _CTX_VDF, "beacon": beacon, "epoch": epoch,
                                         "key": key_id(spki)}))


_OPERATIONS = ("issue", "revoke")
_WORK_HEAD = {op: b"\xa5\x62op" + encode_item(op) + b"\x63ctx" + encode_item(_CTX_WORK)
              + b"\x63key" for op in _OPERATIONS}
"""For each operation, the deterministic CBOR of a work prefix up to the key id's value."""
_BINDING_HEAD = {op: b"\xa7\x62op" + encode_item(op) + b"\x63ctx" + encode_item(_CTX_BINDING)
                 + b"\x64time" for op in _OPERATIONS}
"""For each operation, the deterministic CBOR of a binding statement up to the time
digest's value."""


@functools.lru_cache(maxsize=8)
def _epoch_entry(epoch: int) -> bytes:
    """``"epoch": epoch`` in deterministic CBOR: the same for every request of an epoch."""
    return b"\x65epoch" + encode_head(0, epoch)


def _is_epoch(epoch: Any) -> bool:
    return type(epoch) is int and 0 <= epoch < 1 << 64


@functools.lru_cache(maxsize=4096)
def work_prefix(op: Operation, request: bytes, key: bytes, epoch: int) -> bytes:
    """What the work nonce is appended to: the hash is SHA-256(prefix || nonce).

    ``key`` is the requester's key id (:func:`key_id`). The deterministic CBOR of
    ``{"ctx", "op", "request", "key", "epoch"}``, written in its one key order
    (op, ctx, key, epoch, request) without the generic encoder, which takes any
    value outside that shape (another operation, not bytes, not a 64-bit epoch).
    Kept for the latest requests: a validator computes it when it checks the proofs
    and again when it executes the decision (the proof of work it marks used).
    """
    head = _WORK_HEAD.get(op) if type(op) is str else None
    if head is None or type(request) is not bytes or type(key) is not bytes \
            or not _is_epoch(epoch):
        return encode_deterministic({"ctx": _CTX_WORK, "op": op, "request": request,
                                     "key": key, "epoch": epoch})
    return b"".join((head, encode_head(2, len(key)), key, _epoch_entry(epoch), b"\x67request",
                     encode_head(2, len(request)), request))


def work_hash(prefix: bytes, nonce: bytes) -> bytes:
    return _sha256(prefix + nonce)


def leading_zero_bits(digest: bytes) -> int:
    """Number of leading zero bits of ``digest``."""
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def work_target(difficulty: int) -> bytes:
    """The 32-byte bound a work hash must be below to have ``difficulty`` zero bits."""
    if difficulty <= 0:
        return b"\xff" * 32 + b"\x00"  # every 32-byte hash compares below it
    return (1 << (256 - difficulty)).to_bytes(32, "big")


def binding_statement(*, op: Operation, request: bytes, epoch: int, space: bytes,
                      time: bytes, nonce: bytes) -> bytes:
    """What the requester key signs: the request, epoch and each proof, together.

    ``space`` and ``time`` are :meth:`SpaceProof.digest` and :meth:`TimeProof.digest`.
    The deterministic CBOR of ``{"ctx", "op", "request", "epoch", "space", "time",
    "nonce"}``, written in its one key order (op, ctx, time, epoch, nonce, space,
    request) without the generic encoder, which takes any value outside that shape.
    """
    head = _BINDING_HEAD.get(op) if type(op) is str else None
    if head is None or type(request) is not bytes or type(space) is not bytes \
            or type(time) is not bytes or type(nonce) is not bytes or not _is_epoch(epoch):
        return encode_deterministic({"ctx": _CTX_BINDING, "op": op, "request": request,
                                     "epoch": epoch, "space": space, "time": time,
                                     "nonce": nonce})
    return b"".join((head, encode_head(2, len(time)), time, _epoch_entry(epoch), b"\x65nonce",
                     encode_head(2, len(nonce)), nonce, b"\x65space", encode_head(2, len(space)),
                     space, b"\x67request", encode_head(2, len(request)), request))


def beacon_statement(*, epoch: int, start: int, value: bytes, previous: bytes) -> bytes:
    """What the node's ``beacon`` key signs for each epoch."""
    return encode_deterministic({"ctx": _CTX_BEACON, "epoch": epoch, "start": start,
                                 "value": value, "previous": previous})
