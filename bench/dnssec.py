"""DNSSEC signing per issuance: ``python -m bench.dnssec [--rounds N]``.

Every issuance changes about six RRsets of a TrustChain zone on every
validator (the new name's AAAA, its TLSA, the NSEC records on both sides of
it, the SOA) and each needs a new RRSIG. This times one such set signed the
way the zone signs it (``handlers.dns._rrsig.rrsig``: the RFC 4034 signing
input built once, signed through the keystore's signer) beside the baseline,
``dns.dnssec.sign`` with the same key through the same signer, in the same
run, interleaved round by round; CPU time (``time.process_time``), medians.
Software keys always; SoftHSM2 too when its module is installed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dns.dnssec
import dns.name
import dns.rrset

from handlers.dns import DNSSEC_ALGORITHMS
from handlers.dns._rrsig import rrsig
from store import Signer, SoftwareKeyStore, open_keystore

from .ca import make_softhsm_token

ZONE = dns.name.from_text("trust.")
INCEPTION, EXPIRATION = 1_700_000_000, 2_000_000_000
ISSUANCE = [  # the RRsets one issuance of "new.trust." changes
    ("new.trust.", "AAAA", ["2001:db8::1"]),
    ("_443._quic.new.trust.", "TLSA", ["3 1 1 " + "ab" * 32]),
    ("new.trust.", "NSEC", ["old.trust. AAAA RRSIG NSEC"]),
    ("mid.trust.", "NSEC", ["new.trust. AAAA RRSIG NSEC"]),
    ("_443._quic.new.trust.", "NSEC", ["zzz.trust. TLSA RRSIG NSEC"]),
    ("trust.", "SOA", ["ns1.trust. hostmaster.trust. 7 3600 600 86400 300"]),
]


def _rrsets() -> list[dns.rrset.RRset]:
    return [dns.rrset.from_text_list(owner, 300, "IN", rdtype, rdatas)
            for owner, rdtype, rdatas in ISSUANCE]


def lean(signer: Signer, algorithm: str) -> Callable[[], None]:
    dnskey = dns.dnssec.make_dnskey(signer.public_key(), DNSSEC_ALGORITHMS[algorithm])
    tag = dns.dnssec.key_id(dnskey)
    rrsets = _rrsets()

    def sign_all() -> None:
        for rrset in rrsets:  # the zone computes the digestables as part of the change
            rrsig(rrset.name, rrset.rdtype, rrset.ttl, [rd.to_digestable(ZONE) for rd in rrset],
                  signer=signer, algorithm=dnskey.algorithm, key_tag=tag, zone=ZONE,
                  inception=INCEPTION, expiration=EXPIRATION)
    return sign_all


def dnspython(signer: Signer, algorithm: str) -> Callable[[], None]:
    dnskey = dns.dnssec.make_dnskey(signer.public_key(), DNSSEC_ALGORITHMS[algorithm])
    private = signer.private_key()
    rrsets = _rrsets()

    def sign_all() -> None:
        for rrset in rrsets:
            dns.dnssec.sign(rrset, private, ZONE, dnskey, inception=INCEPTION,
                            expiration=EXPIRATION)
    return sign_all


def _cpu_per_call(work: Callable[[], None], calls: int) -> float:
    started = time.process_time()
    for _ in range(calls):
        work()
    return (time.process_time() - started) / calls


def measure(signer: Signer, algorithm: str, rounds: int, calls: int) -> tuple[float, float]:
    """Median CPU seconds per issuance's RRsets: (baseline, lean)."""
    base, ours = dnspython(signer, algorithm), lean(signer, algorithm)
    base(), ours()  # warm caches
    base_times, our_times = [], []
    for _ in range(rounds):
        base_times.append(_cpu_per_call(base, calls))
        our_times.append(_cpu_per_call(ours, calls))
    return statistics.median(base_times), statistics.median(our_times)


def _signers(tmp: Path) -> list[tuple[str, str, Signer]]:
    found: list[tuple[str, str, Signer]] = []
    software = SoftwareKeyStore(tmp / "soft")
    for algorithm in ("ed25519", "ecdsa-p256-sha256"):
        found.append(("software", algorithm,
                      software.get_or_create(f"zsk-{algorithm}", algorithm)))
    try:
        env, label = make_softhsm_token(tmp / "hsm")
    except RuntimeError as exc:
        print(f"- SoftHSM2 skipped: {exc}", file=sys.stderr)
        return found
    os.environ.update(env)  # before the module is first loaded in this process
    token = open_keystore(provider="softhsm2", data_dir=tmp, token_label=label,
                          pin=env["TRUSTCHAIN_HSM_PIN"])
    found.append(("SoftHSM2", "ecdsa-p256-sha256",
                  token.get_or_create("zsk", "ecdsa-p256-sha256")))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dnssec",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median)")
    parser.add_argument("--calls", type=int, default=200, help="issuances signed per round")
    args = parser.parse_args(argv)
    print("## DNSSEC signing per issuance (6 RRsets), CPU time, median of "
          f"{args.rounds} interleaved rounds of {args.calls}\n")
    print("| keystore | algorithm | dns.dnssec.sign (baseline) | lean RRSIG | ratio |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="trustchain-bench-dnssec-") as tmp:
        for store, algorithm, signer in _signers(Path(tmp)):
            base, ours = measure(signer, algorithm, args.rounds, args.calls)
            print(f"| {store} | {algorithm} | {base * 1e6:,.0f} µs | {ours * 1e6:,.0f} µs | "
                  f"{ours / base:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
