"""RRSIGs made straight from the RFC 4034 §3.1.8.1 signing input.

Every issuance adds or changes a handful of RRsets (AAAA, TLSA, the NSEC
records around the new names, the SOA), and each needs a signature on every
validator. ``dns.dnssec.sign`` spends about 200 µs on one, of which the
signature itself is about 40 µs: the rest is generic rdata handling. Here the
signing input is built from the canonical rdata once, and the key is reached
through :class:`store.Signer`, so a key in a PKCS#11 token signs the same way
as a software key.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.RRSIG
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from dns.dnssectypes import Algorithm

from store import Signer

_RRSIG: Any = dns.rdtypes.ANY.RRSIG.RRSIG  # rdata classes are untyped
_ECDSA_SIZES = {Algorithm.ECDSAP256SHA256: 32, Algorithm.ECDSAP384SHA384: 48}


def rrsig(owner: dns.name.Name, rdtype: int, ttl: int, digestables: Sequence[bytes], *,
          signer: Signer, algorithm: int, key_tag: int, zone: dns.name.Name,
          inception: int, expiration: int) -> Any:
    """The RRSIG rdata of one RRset (class IN) signed by ``signer``.

    :param digestables: the canonical wire form of each rdata
        (``rdata.to_digestable(zone)``); sorted here, as RFC 4034 §6.3 orders them.
    :param algorithm: the DNSKEY algorithm number of ``signer``'s key.
    """
    labels = len(owner) - 1  # the root label does not count (no wildcards here)
    header = struct.pack("!HBBIIIH", rdtype, algorithm, labels, ttl, expiration,
                         inception, key_tag) + _wire(zone)
    prefix = _wire(owner) + struct.pack("!HHI", rdtype, dns.rdataclass.IN, ttl)
    data = header + b"".join(prefix + len(rdata).to_bytes(2, "big") + rdata
                             for rdata in sorted(digestables))
    signature = signer.sign(data)
    size = _ECDSA_SIZES.get(Algorithm(algorithm))
    if size is not None:  # DER from the key; DNSSEC wants r || s (RFC 6605 §4)
        r, s = decode_dss_signature(signature)
        signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return _RRSIG(dns.rdataclass.IN, dns.rdatatype.RRSIG, rdtype, algorithm, labels, ttl,
                  expiration, inception, key_tag, zone, signature)


def _wire(name: dns.name.Name) -> bytes:
    """The canonical (lower-case, uncompressed) wire form of an absolute name."""
    wire = name.canonicalize().to_wire()
    assert wire is not None  # to_wire without a file returns the bytes
    return wire


__all__ = ["rrsig"]
