"""The lean RRSIG signer: what it makes validates with dnspython, for each algorithm the
keystores offer, and is the same signing input dnspython itself would sign."""

from __future__ import annotations

from pathlib import Path

import dns.dnssec
import dns.name
import dns.rrset
import pytest

from handlers.dns import DNSSEC_ALGORITHMS
from handlers.dns._rrsig import rrsig
from store import SoftwareKeyStore

ZONE = dns.name.from_text("trust.")


@pytest.mark.parametrize("algorithm", ["ed25519", "ecdsa-p256-sha256"])
@pytest.mark.parametrize(("owner", "rdtype", "rdatas", "other"), [
    ("Abc.trust.", "AAAA", ["2001:db8::1"], "2001:db8::2"),
    ("abc.trust.", "AAAA", ["2001:db8::2", "2001:db8::1", "2001:db8::10"], "2001:db8::3"),
    ("_443._quic.abc.trust.", "TLSA", ["3 1 1 " + "ab" * 32, "3 1 1 " + "01" * 32],
     "3 1 1 " + "02" * 32),
    ("abc.trust.", "NSEC", ["Def.trust. AAAA RRSIG NSEC"], "def.trust. AAAA NSEC"),
    ("trust.", "SOA", ["ns1.trust. hostmaster.trust. 7 3600 600 86400 300"],
     "ns1.trust. hostmaster.trust. 8 3600 600 86400 300"),
])
def test_signatures_validate(tmp_path: Path, algorithm: str, owner: str, rdtype: str,
                             rdatas: list[str], other: str) -> None:
    signer = SoftwareKeyStore(tmp_path).get_or_create("zsk", algorithm)  # type: ignore[arg-type]
    dnskey = dns.dnssec.make_dnskey(signer.public_key(), DNSSEC_ALGORITHMS[algorithm])
    rrset = dns.rrset.from_text_list(owner, 300, "IN", rdtype, rdatas)
    digestables = [rd.to_digestable(ZONE) for rd in rrset]
    sig = rrsig(rrset.name, rrset.rdtype, rrset.ttl, digestables, signer=signer,
                algorithm=dnskey.algorithm, key_tag=dns.dnssec.key_id(dnskey), zone=ZONE,
                inception=1_700_000_000, expiration=2_000_000_000)
    keys = {ZONE: dns.rrset.from_rdata(ZONE, 3600, dnskey)}
    dns.dnssec.validate(rrset, dns.rrset.from_rdata(rrset.name, 300, sig), keys,
                        now=1_800_000_000)
    # other data does not validate under it
    changed = dns.rrset.from_text_list(owner, 300, "IN", rdtype, [other, *rdatas[1:]])
    with pytest.raises(dns.dnssec.ValidationFailure):
        dns.dnssec.validate(changed, dns.rrset.from_rdata(rrset.name, 300, sig), keys,
                            now=1_800_000_000)
