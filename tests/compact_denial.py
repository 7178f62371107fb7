"""Reading compact denials of existence (RFC 9824) in responses, for the DNS tests."""

from __future__ import annotations

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

NXNAME = 128


def nsec_types(window: tuple[int, bytes]) -> list[int]:
    """The types one window of an NSEC type bitmap lists."""
    number, bitmap = window
    return [number * 256 + i * 8 + j for i, byte in enumerate(bitmap) for j in range(8)
            if byte & (0x80 >> j)]


def compact_nsec(response: dns.message.Message, qname: dns.name.Name) -> set[int]:
    """The type bitmap of the response's one NSEC, after checking that it is a compact
    denial's: at ``qname``, next name ``\\000.QNAME``."""
    found = [r for r in response.authority + response.answer
             if r.rdtype == dns.rdatatype.NSEC]
    assert len(found) == 1 and found[0].name == qname and len(found[0]) == 1
    assert found[0][0].next == dns.name.Name((b"\x00", *qname.labels))
    return {t for w in found[0][0].windows for t in nsec_types(w)}


def effective_rcode(response: dns.message.Message) -> int:
    """NXDOMAIN for a compact answer whose NSEC at the query name carries NXNAME
    (RFC 9824 §4, as a resolver restores it), else the response code."""
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.NSEC and response.question and \
                rrset.name == response.question[0].name and \
                NXNAME in {t for w in rrset[0].windows for t in nsec_types(w)}:
            return dns.rcode.NXDOMAIN
    return response.rcode()
