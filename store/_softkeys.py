"""Software keys on disk: development only.

Each key is an unencrypted PKCS#8 PEM file ``NAME.pem`` (mode 0600) in one
directory (mode 0700). Anyone who can read the data directory owns the CA, so
production refuses this store (see ``ca.mode``) and we log a warning when
opening it.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ._errors import KeyStoreError
from ._files import write_atomic
from ._signer import (
    ECDSA_WITH_SHA256,
    Algorithm,
    PrivateKey,
    PublicKey,
    algorithm_of,
    check_algorithm,
    check_name,
)

log = logging.getLogger("trustchain.keys")



class SoftwareSigner:
    """A private key held in this process's memory."""

    def __init__(self, name: str, key: PrivateKey) -> None:
        self.name = name
        self.algorithm: Algorithm = algorithm_of(key)
        self._key = key
        self._public = key.public_key()

    def __repr__(self) -> str:
        return f"<SoftwareSigner {self.name} {self.algorithm}>"

    def public_key(self) -> PublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(data)
        return self._key.sign(data, ECDSA_WITH_SHA256)

    def private_key(self) -> PrivateKey:
        return self._key


class SoftwareKeyStore:
    """PEM files in ``directory``; cached after the first read."""

    kind: Literal["software", "pkcs11"] = "software"

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._signers: dict[str, SoftwareSigner] = {}
        self._closed = False
        log.warning("software signing keys in %s: for development only, never for a "
                    "public CA", self.directory)

    def __repr__(self) -> str:
        return f"<SoftwareKeyStore {self.directory}>"

    def _path(self, name: str) -> Path:
        return self.directory / f"{check_name(name)}.pem"

    def _check_open(self) -> None:
        if self._closed:
            raise KeyStoreError(f"key store {self.directory} is closed")

    def get(self, name: str) -> SoftwareSigner | None:
        path = self._path(name)
        with self._lock:
            self._check_open()
            return self._load(name, path)

    def _load(self, name: str, path: Path) -> SoftwareSigner | None:
        signer = self._signers.get(name)
        if signer is not None:
            return signer
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyStoreError(f"cannot read key {name!r} from {path}: {exc}") from exc
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyStoreError(f"key file {path} is not an unencrypted PEM private key: "
                                f"{exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
            raise KeyStoreError(f"key file {path} holds a {type(key).__name__}, "
                                "not a P-256 or Ed25519 key")
        try:
            signer = SoftwareSigner(name, key)
        except KeyStoreError as exc:
            raise KeyStoreError(f"key file {path}: {exc}") from exc
        self._signers[name] = signer
        return signer

    def create(self, name: str, algorithm: Algorithm = "ecdsa-p256-sha256") -> SoftwareSigner:
        path = self._path(name)
        algorithm = check_algorithm(algorithm)
        with self._lock:
            self._check_open()
            if self._load(name, path) is not None:
                raise KeyStoreError(f"key {name!r} already exists in {self.directory}")
            return self._create(name, path, algorithm)

    def get_or_create(self, name: str,
                      algorithm: Algorithm = "ecdsa-p256-sha256") -> SoftwareSigner:
        path = self._path(name)
        algorithm = check_algorithm(algorithm)
        with self._lock:
            self._check_open()
            return self._load(name, path) or self._create(name, path, algorithm)

    def import_key(self, name: str, pem: bytes) -> SoftwareSigner:
        """Store a private key made elsewhere as ``name`` (a development cluster's shared
        root: ``trustchain cluster init``); refuses to replace a key.

        :raises KeyStoreError: ``name`` exists, or ``pem`` is not a P-256/Ed25519 key.
        """
        path = self._path(name)
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyStoreError(f"key {name!r} is not an unencrypted PEM private key: "
                                f"{exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
            raise KeyStoreError(f"key {name!r} is a {type(key).__name__}, not a P-256 or "
                                "Ed25519 key")
        with self._lock:
            self._check_open()
            if self._load(name, path) is not None:
                raise KeyStoreError(f"key {name!r} already exists in {self.directory}")
            signer = SoftwareSigner(name, key)
            try:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                write_atomic(path, pem, mode=0o600)
            except OSError as exc:
                raise KeyStoreError(f"cannot write key {name!r} to {path}: {exc}") from exc
            self._signers[name] = signer
            return signer

    def _create(self, name: str, path: Path, algorithm: Algorithm) -> SoftwareSigner:
        key: PrivateKey
        if algorithm == "ed25519":
            key = ed25519.Ed25519PrivateKey.generate()
        else:
            key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(path, pem, mode=0o600)
        except OSError as exc:
            raise KeyStoreError(f"cannot write key {name!r} to {path}: {exc}") from exc
        signer = SoftwareSigner(name, key)
        self._signers[name] = signer
        log.info("created software %s key %r in %s", algorithm, name, self.directory)
        return signer

    def names(self) -> list[str]:
        with self._lock:
            self._check_open()
            try:
                entries = os.listdir(self.directory)
            except FileNotFoundError:
                return []
            except OSError as exc:
                raise KeyStoreError(f"cannot list keys in {self.directory}: {exc}") from exc
        stems = (entry.removesuffix(".pem") for entry in entries if entry.endswith(".pem"))
        return sorted(stem for stem in stems if _valid(stem))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._signers.clear()


def _valid(name: str) -> bool:
    try:
        check_name(name)
    except KeyStoreError:
        return False
    return True
