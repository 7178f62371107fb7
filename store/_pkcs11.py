"""PKCS#11 keys through python-pkcs11: SoftHSM2, AWS CloudHSM, a YubiHSM.

Keys are generated inside the token and never leave it (CKA_SENSITIVE, not
CKA_EXTRACTABLE). ECDSA hashes on the host and signs the digest with
``CKM_ECDSA`` because SoftHSM2 2.6 has no ``CKM_ECDSA_SHA256``; the token's raw
r||s becomes DER here. ``cryptography`` has no external-signer API, so
:meth:`Pkcs11Signer.private_key` returns an object registered as (a subclass of)
``EllipticCurvePrivateKey`` / ``Ed25519PrivateKey`` whose ``sign()`` calls the
token: ``CertificateBuilder.sign()`` accepts it.

PKCS#11 login state belongs to the process, not to a session: a second
``C_Login`` fails with CKR_USER_ALREADY_LOGGED_IN, and ``C_Logout`` (which
python-pkcs11 calls when closing a session opened with a PIN) logs out every
session. So each token gets one process-wide *login session* that stays open
while any store uses the token, every store works in its own PIN-less session
(logged in by the token's rule), and a later store on the same token must
present the same PIN. python-pkcs11 sessions are not thread-safe: each store
serialises its session behind a lock.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

import pkcs11
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, utils
from cryptography.utils import Buffer
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11

from ._errors import KeyStoreError
from ._signer import (
    Algorithm,
    PrivateKey,
    PublicKey,
    check_algorithm,
    check_name,
)

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Library

log = logging.getLogger("trustchain.keys")

T = TypeVar("T")

# DER ECParameters / EdDSA parameters: namedCurve prime256v1, id-Ed25519, and the
# PrintableString "edwards25519" some tokens use (PKCS#11 3.0 allows both).
_P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")
_ED25519_OID = bytes.fromhex("06032b6570")
_ED25519_NAME = b"\x13\x0cedwards25519"

_NEEDS: dict[Algorithm, tuple[Mechanism, Mechanism]] = {
    "ecdsa-p256-sha256": (Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA),
    "ed25519": (Mechanism.EC_EDWARDS_KEY_PAIR_GEN, Mechanism.EDDSA),
}

# python-pkcs11 exceptions mostly carry no message: say what they mean.
_MEANINGS: dict[type[p11.PKCS11Error], str] = {
    p11.PinIncorrect: "PIN incorrect",
    p11.PinLenRange: "PIN incorrect (wrong length)",
    p11.PinInvalid: "PIN invalid",
    p11.PinLocked: "PIN locked",
    p11.PinExpired: "PIN expired",
    p11.UserPinNotInitialized: "the token's user PIN is not initialised",
    p11.UserAlreadyLoggedIn: "the token is already logged in by other code in this process "
                             "(open it only through Pkcs11KeyStore)",
    p11.UserNotLoggedIn: "not logged in",
    p11.TokenNotPresent: "token not present",
    p11.TokenNotRecognised: "token not recognised",
    p11.DeviceRemoved: "device removed",
    p11.DeviceError: "device error",
    p11.DeviceMemory: "the token is out of memory",
    p11.SessionCount: "too many sessions open on the token",
    p11.SessionHandleInvalid: "session no longer valid",
    p11.SessionClosed: "session closed",
    p11.MechanismInvalid: "mechanism not supported by this token",
    p11.TemplateInconsistent: "key template refused by the token",
    p11.AttributeSensitive: "attribute is sensitive",
    p11.KeyHandleInvalid: "key handle no longer valid",
}


def _describe(exc: p11.PKCS11Error) -> str:
    """A readable reason for a python-pkcs11 error (they rarely have a message)."""
    detail = str(exc)
    if type(exc) is p11.PKCS11Error and detail:
        return detail
    meaning = _MEANINGS.get(type(exc), type(exc).__name__)
    return f"{meaning} ({detail})" if detail and detail != meaning else meaning


@dataclass
class _Login:
    """The process-wide login on one token, shared by every store using it."""

    session: pkcs11.Session
    pin_digest: bytes
    users: int = 0


_logins: dict[tuple[str, int, bytes], _Login] = {}
_logins_lock = threading.Lock()
# Stores opened after the first must present the same PIN; keep only a keyed digest.
_PIN_KEY = secrets.token_bytes(32)


def _pin_digest(pin: str) -> bytes:
    return hmac.new(_PIN_KEY, pin.encode(), hashlib.sha256).digest()


class _TokenEcKey(ec.EllipticCurvePrivateKey):
    """A P-256 key in the token, shaped so ``cryptography``'s builders can sign with it."""

    def __init__(self, signer: Pkcs11Signer, public: ec.EllipticCurvePublicKey) -> None:
        self._signer = signer
        self._public = public

    def __repr__(self) -> str:
        return f"<token EC key {self._signer.name}>"

    def sign(self, data: Buffer,
             signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise KeyStoreError(f"key {self._signer.name!r} signs only with ECDSA")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, utils.Prehashed):
            digest = bytes(data)
            if len(digest) != algorithm.digest_size:
                raise KeyStoreError(f"prehashed digest is {len(digest)} bytes, "
                                    f"expected {algorithm.digest_size}")
        else:
            hasher = hashes.Hash(algorithm)
            hasher.update(data)
            digest = hasher.finalize()
        return self._signer.sign_digest(digest)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise KeyStoreError(f"key {self._signer.name!r} is a signing key: no ECDH")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise _not_exportable(self._signer.name)

    def private_bytes(self, encoding: serialization.Encoding,
                      format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption) -> bytes:
        raise _not_exportable(self._signer.name)

    def __copy__(self) -> _TokenEcKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _TokenEcKey:
        return self


class _TokenEd25519Key(ed25519.Ed25519PrivateKey):
    """An Ed25519 key in the token, shaped so ``cryptography``'s builders can sign with it."""

    def __init__(self, signer: Pkcs11Signer, public: ed25519.Ed25519PublicKey) -> None:
        self._signer = signer
        self._public = public

    def __repr__(self) -> str:
        return f"<token Ed25519 key {self._signer.name}>"

    def sign(self, data: Buffer) -> bytes:
        return self._signer.sign(bytes(data))

    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self._public

    def private_bytes(self, encoding: serialization.Encoding,
                      format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption) -> bytes:
        raise _not_exportable(self._signer.name)

    def private_bytes_raw(self) -> bytes:
        raise _not_exportable(self._signer.name)

    def __copy__(self) -> _TokenEd25519Key:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _TokenEd25519Key:
        return self


def _not_exportable(name: str) -> KeyStoreError:
    return KeyStoreError(f"key {name!r} lives in the HSM and cannot be exported")


class Pkcs11Signer:
    """A key pair in a PKCS#11 token; signs through its store's session."""

    def __init__(self, store: Pkcs11KeyStore, name: str, algorithm: Algorithm,
                 key: pkcs11.SignMixin, public: PublicKey) -> None:
        self.name = name
        self.algorithm: Algorithm = algorithm
        self._store = store
        self._key = key
        self._public = public
        self._adapter: PrivateKey
        if isinstance(public, ed25519.Ed25519PublicKey):
            self._adapter = _TokenEd25519Key(self, public)
        else:
            self._adapter = _TokenEcKey(self, public)

    def __repr__(self) -> str:
        return f"<Pkcs11Signer {self.name} {self.algorithm}>"

    def public_key(self) -> PublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        if self.algorithm == "ed25519":
            return self._store._sign(self._key, data, Mechanism.EDDSA, self.name)
        return self.sign_digest(hashlib.sha256(data).digest())

    def sign_digest(self, digest: bytes) -> bytes:
        """ECDSA over an already computed digest; returns the DER signature."""
        if self.algorithm != "ecdsa-p256-sha256":
            raise KeyStoreError(f"key {self.name!r} is {self.algorithm}: no digest signing")
        raw = self._store._sign(self._key, digest, Mechanism.ECDSA, self.name)
        if len(raw) != 64:
            raise KeyStoreError(f"token returned a {len(raw)}-byte ECDSA signature for key "
                                f"{self.name!r}, expected 64 (r||s)")
        return utils.encode_dss_signature(int.from_bytes(raw[:32]), int.from_bytes(raw[32:]))

    def private_key(self) -> PrivateKey:
        return self._adapter


class Pkcs11KeyStore:
    """Keys labelled by name in one PKCS#11 token, through one locked session."""

    kind: Literal["software", "pkcs11"] = "pkcs11"

    def __init__(self, module_path: str, token_label: str, pin: str) -> None:
        if not module_path:
            raise KeyStoreError("PKCS#11 module_path is required")
        if not token_label:
            raise KeyStoreError(f"PKCS#11 token_label is required (module {module_path})")
        if not pin:
            raise KeyStoreError(f"PIN for PKCS#11 token {token_label!r} is required")
        self.module_path = module_path
        self.token_label = token_label
        self._where = f"token {token_label!r} in {module_path}"
        self._lock = threading.Lock()
        self._signers: dict[str, Pkcs11Signer] = {}
        with _logins_lock:
            lib = _load_module(module_path)
            token = _find_token(lib, module_path, token_label)
            try:
                self._login_key = (module_path, token.slot.slot_id, token.serial)
                mechanisms = token.slot.get_mechanisms()
            except p11.PKCS11Error as exc:
                raise KeyStoreError(f"cannot query {self._where}: {_describe(exc)}") from exc
            _log_in(token, pin, self._login_key, self._where).users += 1
            try:
                session = token.open(rw=True)
            except p11.PKCS11Error as exc:
                _release(self._login_key)
                raise KeyStoreError(f"cannot open a session on {self._where}: "
                                    f"{_describe(exc)}") from exc
        self._session: pkcs11.Session | None = session
        self._mechanisms = frozenset(mechanisms)

    def __repr__(self) -> str:
        return f"<Pkcs11KeyStore {self._where}>"

    def _use(self, what: str, action: Callable[[pkcs11.Session], T]) -> T:
        """Run ``action`` on the session, holding the lock; errors become KeyStoreError."""
        with self._lock:
            if self._session is None:
                raise KeyStoreError(f"key store for {self._where} is closed")
            try:
                return action(self._session)
            except p11.PKCS11Error as exc:
                raise KeyStoreError(f"{what} on {self._where} failed: "
                                    f"{_describe(exc)}") from exc

    def _sign(self, key: pkcs11.SignMixin, data: bytes, mechanism: Mechanism,
              name: str) -> bytes:
        return self._use(f"signing with key {name!r}",
                         lambda _session: key.sign(data, mechanism=mechanism))

    def get(self, name: str) -> Pkcs11Signer | None:
        check_name(name)
        return self._use(f"finding key {name!r}", lambda session: self._find(session, name))

    def create(self, name: str, algorithm: Algorithm = "ecdsa-p256-sha256") -> Pkcs11Signer:
        check_name(name)
        algorithm = check_algorithm(algorithm)

        def create(session: pkcs11.Session) -> Pkcs11Signer:
            if self._find(session, name) is not None:
                raise KeyStoreError(f"key {name!r} already exists in {self._where}")
            return self._generate(session, name, algorithm)

        return self._use(f"creating key {name!r}", create)

    def get_or_create(self, name: str,
                      algorithm: Algorithm = "ecdsa-p256-sha256") -> Pkcs11Signer:
        check_name(name)
        algorithm = check_algorithm(algorithm)
        return self._use(f"creating key {name!r}", lambda session: (
            self._find(session, name) or self._generate(session, name, algorithm)))

    def label_of_id(self, key_id: bytes) -> str | None:
        """The label of the one private key whose CKA_ID is ``key_id`` (a key an operator
        made with the token's own tools); None if there is none."""
        def find(session: pkcs11.Session) -> str | None:
            found = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                              Attribute.ID: key_id}))
            if len(found) > 1:
                raise KeyStoreError(f"{len(found)} private keys have CKA_ID {key_id.hex()} in "
                                    f"{self._where}; remove all but one")
            return str(found[0][Attribute.LABEL]) if found else None

        return self._use("finding a key by id", find)

    def names(self) -> list[str]:
        def labels(session: pkcs11.Session) -> list[str]:
            found = session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
            return [str(key[Attribute.LABEL]) for key in found]

        return sorted({label for label in self._use("listing keys", labels) if _valid(label)})

    def close(self) -> None:
        with self._lock:
            session, self._session = self._session, None
            self._signers.clear()
        if session is None:
            return
        try:
            session.close()
        except p11.PKCS11Error as exc:
            log.warning("closing the session on %s: %s", self._where, _describe(exc))
        with _logins_lock:
            _release(self._login_key)

    def _find(self, session: pkcs11.Session, name: str) -> Pkcs11Signer | None:
        """The cached or token-held key labelled ``name`` (lock held)."""
        signer = self._signers.get(name)
        if signer is not None:
            return signer
        found = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                          Attribute.LABEL: name}))
        if not found:
            return None
        if len(found) > 1:
            raise KeyStoreError(f"{len(found)} private keys are labelled {name!r} in "
                                f"{self._where}; remove all but one")
        key = found[0]
        if not isinstance(key, pkcs11.SignMixin):
            raise KeyStoreError(f"key {name!r} in {self._where} cannot sign (CKA_SIGN false)")
        publics = list(session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                                            Attribute.LABEL: name,
                                            Attribute.ID: key[Attribute.ID]}))
        if len(publics) != 1:
            raise KeyStoreError(f"key {name!r} in {self._where} has {len(publics)} public key "
                                "objects with its label and CKA_ID, expected 1")
        algorithm, public = self._public_key(name, key[Attribute.KEY_TYPE], publics[0])
        attrs = key.get_attributes([Attribute.SENSITIVE, Attribute.EXTRACTABLE])
        if not attrs[Attribute.SENSITIVE] or attrs[Attribute.EXTRACTABLE]:
            log.warning("key %r in %s can leave the token (CKA_SENSITIVE=%s, "
                        "CKA_EXTRACTABLE=%s)", name, self._where, attrs[Attribute.SENSITIVE],
                        attrs[Attribute.EXTRACTABLE])
        signer = Pkcs11Signer(self, name, algorithm, key, public)
        self._signers[name] = signer
        return signer

    def _public_key(self, name: str, key_type: KeyType,
                    public: pkcs11.Object) -> tuple[Algorithm, PublicKey]:
        """Turn the token's public key object into a ``cryptography`` key."""
        params = bytes(public[Attribute.EC_PARAMS]) if key_type in (
            KeyType.EC, KeyType.EC_EDWARDS) else b""
        try:
            if key_type == KeyType.EC and params == _P256_PARAMS:
                point = _octet_string(public[Attribute.EC_POINT], 65)
                return ("ecdsa-p256-sha256",
                        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point))
            if key_type == KeyType.EC_EDWARDS and params in (_ED25519_OID, _ED25519_NAME):
                point = _octet_string(public[Attribute.EC_POINT], 32)
                return "ed25519", ed25519.Ed25519PublicKey.from_public_bytes(point)
        except ValueError as exc:
            raise KeyStoreError(f"public key of {name!r} in {self._where} is malformed: "
                                f"{exc}") from exc
        raise KeyStoreError(f"key {name!r} in {self._where} is {key_type.name} with parameters "
                            f"{params.hex() or 'none'}: only P-256 and Ed25519 are supported")

    def _generate(self, session: pkcs11.Session, name: str,
                  algorithm: Algorithm) -> Pkcs11Signer:
        """Generate a key pair inside the token (lock held)."""
        missing = [m.name for m in _NEEDS[algorithm] if m not in self._mechanisms]
        if missing:
            raise KeyStoreError(f"{algorithm} keys are not supported by this token "
                                f"({self._where} lacks {', '.join(missing)})")
        if algorithm == "ed25519":
            key_type, params = KeyType.EC_EDWARDS, _ED25519_OID
        else:
            key_type, params = KeyType.EC, _P256_PARAMS
        public, private = session.generate_keypair(
            key_type, id=secrets.token_bytes(16), label=name, store=True,
            capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            mechanism=_NEEDS[algorithm][0],
            public_template={Attribute.EC_PARAMS: params, Attribute.TOKEN: True,
                             Attribute.PRIVATE: False},
            private_template={Attribute.TOKEN: True, Attribute.PRIVATE: True,
                              Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
        attrs = private.get_attributes([Attribute.SENSITIVE, Attribute.EXTRACTABLE])
        if not attrs[Attribute.SENSITIVE] or attrs[Attribute.EXTRACTABLE]:
            private.destroy()
            public.destroy()
            raise KeyStoreError(f"{self._where} made key {name!r} exportable despite the "
                                "template; refusing to use it")
        if not isinstance(private, pkcs11.SignMixin):
            raise KeyStoreError(f"{self._where} made key {name!r} without CKA_SIGN")
        _, public_key = self._public_key(name, key_type, public)
        signer = Pkcs11Signer(self, name, algorithm, private, public_key)
        self._signers[name] = signer
        log.info("created %s key %r in %s", algorithm, name, self._where)
        return signer


def _octet_string(value: bytes, size: int) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING by the standard, raw on some tokens: accept both."""
    value = bytes(value)
    if len(value) == size + 2 and value[0] == 0x04 and value[1] == size:
        return value[2:]
    if len(value) == size:
        return value
    raise ValueError(f"CKA_EC_POINT of {len(value)} bytes, expected {size} (or DER-wrapped)")


def _valid(name: str) -> bool:
    try:
        check_name(name)
    except KeyStoreError:
        return False
    return True


def _load_module(module_path: str) -> Pkcs11Library:
    """Load (once per process: python-pkcs11 caches it) the PKCS#11 shared library."""
    if not os.path.isfile(module_path):
        raise KeyStoreError(f"PKCS#11 module {module_path} not found")
    try:
        return pkcs11.lib(module_path)
    except p11.PKCS11Error as exc:
        raise KeyStoreError(f"cannot load PKCS#11 module {module_path}: "
                            f"{_describe(exc)}") from exc


def _find_token(lib: Pkcs11Library, module_path: str, label: str) -> pkcs11.Token:
    try:
        return lib.get_token(token_label=label)
    except p11.NoSuchToken as exc:
        try:
            labels = sorted(repr(t.label) for t in lib.get_tokens() if t.label)
        except p11.PKCS11Error:
            labels = []
        raise KeyStoreError(f"no token labelled {label!r} in PKCS#11 module {module_path} "
                            f"(tokens: {', '.join(labels) or 'none'})") from exc
    except p11.MultipleTokensReturned as exc:
        raise KeyStoreError(f"several tokens are labelled {label!r} in PKCS#11 module "
                            f"{module_path}") from exc
    except p11.PKCS11Error as exc:
        raise KeyStoreError(f"cannot list the tokens of PKCS#11 module {module_path}: "
                            f"{_describe(exc)}") from exc


def _log_in(token: pkcs11.Token, pin: str, key: tuple[str, int, bytes],
            where: str) -> _Login:
    """The token's process-wide login, made now or checked against ``pin`` (lock held)."""
    digest = _pin_digest(pin)
    login = _logins.get(key)
    if login is not None:
        if not hmac.compare_digest(login.pin_digest, digest):
            raise KeyStoreError(f"cannot log in to {where}: PIN incorrect (it differs from the "
                                "PIN of the store already open on this token)")
        return login
    try:
        session = token.open(user_pin=pin)
    except p11.PKCS11Error as exc:
        raise KeyStoreError(f"cannot log in to {where}: {_describe(exc)}") from exc
    login = _logins[key] = _Login(session, digest)
    return login


def _release(key: tuple[str, int, bytes]) -> None:
    """One store fewer on the token; the last one out logs out (lock held)."""
    login = _logins.get(key)
    if login is None:
        return
    login.users -= 1
    if login.users > 0:
        return
    del _logins[key]
    try:
        login.session.close()
    except p11.PKCS11Error as exc:
        log.warning("logging out of %s: %s", key[0], _describe(exc))
