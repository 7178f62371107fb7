"""Open the key store that ``ca.hsm.provider`` names."""

from __future__ import annotations

from pathlib import Path

from ._errors import KeyStoreError
from ._pkcs11 import Pkcs11KeyStore
from ._signer import KeyStore
from ._softkeys import SoftwareKeyStore

SOFTHSM2_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PKCS11_PROVIDERS = ("softhsm2", "pkcs11", "aws_cloudhsm", "yubihsm")
PROVIDERS = ("software", *PKCS11_PROVIDERS)


def open_keystore(*, provider: str, data_dir: Path, module_path: str = "",
                  token_label: str = "", pin: str = "") -> KeyStore:
    """Software keys under ``data_dir/keys``, or the PKCS#11 token ``token_label``.

    Every PKCS#11 provider loads the same way (module, token label, PIN); only
    SoftHSM2 has a module path we can guess.
    """
    if provider == "software":
        return SoftwareKeyStore(Path(data_dir) / "keys")
    if provider not in PKCS11_PROVIDERS:
        raise KeyStoreError(f"unknown key provider {provider!r}: use one of "
                            f"{', '.join(PROVIDERS)}")
    if not module_path:
        if provider != "softhsm2":
            raise KeyStoreError(f"key provider {provider!r} needs module_path, the path of "
                                "its PKCS#11 shared library")
        module_path = SOFTHSM2_MODULE
    if not token_label:
        raise KeyStoreError(f"key provider {provider!r} needs token_label")
    if not pin:
        raise KeyStoreError(f"key provider {provider!r} needs the token's PIN")
    return Pkcs11KeyStore(module_path, token_label, pin)
