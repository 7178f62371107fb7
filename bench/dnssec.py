"""DNSSEC cost per issuance and per answer: ``python -m bench.dnssec [--part rrsig|zone]``.

Every validator of a cluster executes every issuance, so what the zones do
when a certificate is published is paid by every validator; what they do to
answer a query, only by the validator asked. Two parts, CPU time
(``time.process_time``), medians of interleaved rounds:

``rrsig``: one RRSIG made the way the zone makes it
(``handlers.dns._rrsig.rrsig``: the RFC 4034 signing input built once,
signed through the keystore's signer) beside ``dns.dnssec.sign`` with the
same key through the same signer, for the six RRsets an issuance changed
when the zone signed them at once (AAAA, TLSA, three NSECs, the SOA).
Software keys always; SoftHSM2 too when its module is installed.

``zone``: the zones of a node (``TrustChainZones`` over a real state database,
an Ed25519 key in a software keystore, ``--zone`` certificates published
first); timed are ``certificate_issued`` of a new name (published at once:
no event loop), the first DO query for its AAAA through the DoQ answer path,
the same question in another form (RD clear: rendered again, the RRSIG
from the signature cache, if any), the same query again (the rendered
answer), a DO query for a name that does not exist (its denial), and the
certificate's ``certificate_revoked``. ``--against DIR`` runs this part in
turn in this tree and in the source tree ``DIR`` (a snapshot of another
branch: only the zones' public API is used), one child process per round
and tree, and prints both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.dnssec
import dns.message
import dns.name
import dns.rrset

ZONE = dns.name.from_text("trust.")
INCEPTION, EXPIRATION = 1_700_000_000, 2_000_000_000
ISSUANCE = [  # the RRsets one issuance of "new.trust." changed in an NSEC-chain zone
    ("new.trust.", "AAAA", ["2001:db8::1"]),
    ("_443._quic.new.trust.", "TLSA", ["3 1 1 " + "ab" * 32]),
    ("new.trust.", "NSEC", ["old.trust. AAAA RRSIG NSEC"]),
    ("mid.trust.", "NSEC", ["new.trust. AAAA RRSIG NSEC"]),
    ("_443._quic.new.trust.", "NSEC", ["zzz.trust. TLSA RRSIG NSEC"]),
    ("trust.", "SOA", ["ns1.trust. hostmaster.trust. 7 3600 600 86400 300"]),
]
ZONE_STEPS = ("issue", "first DO answer", "DO answer, cached RRSIG", "rendered answer",
              "denial (no such name)", "revoke")


# --- part rrsig ----------------------------------------------------------------------


def _rrsets() -> list[dns.rrset.RRset]:
    return [dns.rrset.from_text_list(owner, 300, "IN", rdtype, rdatas)
            for owner, rdtype, rdatas in ISSUANCE]


def lean(signer: Any, algorithm: str) -> Callable[[], None]:
    from handlers.dns import DNSSEC_ALGORITHMS
    from handlers.dns._rrsig import rrsig
    dnskey = dns.dnssec.make_dnskey(signer.public_key(), DNSSEC_ALGORITHMS[algorithm])
    tag = dns.dnssec.key_id(dnskey)
    rrsets = _rrsets()

    def sign_all() -> None:
        for rrset in rrsets:
            rrsig(rrset.name, rrset.rdtype, rrset.ttl, [rd.to_digestable(ZONE) for rd in rrset],
                  signer=signer, algorithm=dnskey.algorithm, key_tag=tag, zone=ZONE,
                  inception=INCEPTION, expiration=EXPIRATION)
    return sign_all


def dnspython(signer: Any, algorithm: str) -> Callable[[], None]:
    from handlers.dns import DNSSEC_ALGORITHMS
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


def measure(signer: Any, algorithm: str, rounds: int, calls: int) -> tuple[float, float]:
    """Median CPU seconds per issuance's six RRsets: (baseline, lean)."""
    base, ours = dnspython(signer, algorithm), lean(signer, algorithm)
    base(), ours()  # warm caches
    base_times, our_times = [], []
    for _ in range(rounds):
        base_times.append(_cpu_per_call(base, calls))
        our_times.append(_cpu_per_call(ours, calls))
    return statistics.median(base_times), statistics.median(our_times)


def _signers(tmp: Path) -> list[tuple[str, str, Any]]:
    from bench.ca import make_softhsm_token
    from store import SoftwareKeyStore, open_keystore
    found: list[tuple[str, str, Any]] = []
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


def rrsig_part(rounds: int, calls: int) -> None:
    print("## One RRSIG per RRset: the 6 RRsets an issuance changed in an NSEC-chain zone, "
          f"CPU time, median of {rounds} interleaved rounds of {calls}\n")
    print("| keystore | algorithm | dns.dnssec.sign (baseline) | lean RRSIG | ratio |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="trustchain-bench-dnssec-") as tmp:
        for store, algorithm, signer in _signers(Path(tmp)):
            base, ours = measure(signer, algorithm, rounds, calls)
            print(f"| {store} | {algorithm} | {base * 1e6:,.0f} µs | {ours * 1e6:,.0f} µs | "
                  f"{ours / base:.2f} |", flush=True)


# --- part zone -----------------------------------------------------------------------


def _record(name: str, address: str, at: float) -> Any:
    """A published certificate's record as the zones read it (no DER needed)."""
    from store import CertificateRecord
    digest = hashlib.sha256(name.encode()).hexdigest()
    return CertificateRecord(serial=digest[:32], der=b"", fingerprint=digest,
                             spki_sha256=hashlib.sha256(digest.encode()).hexdigest(),
                             issuer="bench", not_before=at - 300, not_after=at + 86400,
                             issued_at=at, revoked_at=None, revocation_reason=None,
                             names=(name, address))


def zone_round(size: int, calls: int) -> dict[str, float]:
    """One round in this process: median CPU seconds of each of :data:`ZONE_STEPS`."""
    import dataclasses

    from handlers.ca import CertificateIssued, CertificateRevoked
    from handlers.dns import (
        DnsAnswers,
        DnsSettings,
        KeyRing,
        RenderedAnswers,
        TrustChainZones,
    )
    from protocol import Peer
    from protocol.doq import QueryReceived, parse_query
    from store import DataDirectory, SoftwareKeyStore

    peer = Peer(address="::1", port=853, alpn="doq")
    with tempfile.TemporaryDirectory(prefix="trustchain-bench-zone-") as tmp:
        data = DataDirectory(Path(tmp))
        state = data.state()
        keyring = KeyRing(keystore=SoftwareKeyStore(Path(tmp) / "keys"),
                          schedule=data.dns_key_schedule(), algorithm="ed25519")
        rendered = RenderedAnswers()
        zones = TrustChainZones(settings=DnsSettings(domains=("trust",),
                                                     nameserver_addresses=("2001:db8::53",)),
                                state=state, keyring=keyring, rendered=rendered)
        zones.start()
        answers = DnsAnswers(zones=zones, forwarder=None, rendered=rendered)
        now = time.time()
        for i in range(size):
            zones.certificate_issued(CertificateIssued(
                record=_record(f"host{i}.trust", f"2001:db8::{i % 65536:x}", now), logged=None))

        def ask(name: str, rd: bool = True) -> None:
            query = dns.message.make_query(name, "AAAA", want_dnssec=True)
            query.id = 0
            if not rd:
                query.flags = 0
            wire = query.to_wire()
            answers.answer_doq(QueryReceived(0, wire, parse_query(wire)), peer)

        times: dict[str, list[float]] = {step: [] for step in ZONE_STEPS}
        for call in range(calls):
            name = f"new{call}.trust"
            record = _record(name, "2001:db8:1::1", now)
            revoked = dataclasses.replace(record, revoked_at=now)
            steps: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = [
                ("issue", zones.certificate_issued, (CertificateIssued(record=record,
                                                                       logged=None),)),
                ("first DO answer", ask, (name,)),
                ("DO answer, cached RRSIG", ask, (name, False)),
                ("rendered answer", ask, (name,)),
                ("denial (no such name)", ask, (f"none{call}.trust",)),
                ("revoke", zones.certificate_revoked, (CertificateRevoked(record=revoked),)),
            ]
            for step, work, work_args in steps:
                started = time.process_time()
                work(*work_args)
                times[step].append(time.process_time() - started)
        state.close()
    return {step: statistics.median(values) for step, values in times.items()}


def zone_part(rounds: int, calls: int, size: int, against: Path | None) -> None:
    trees = [("this tree", Path(__file__).resolve().parents[1])]
    if against is not None:
        trees.append((str(against), against.resolve()))
    results: dict[str, list[dict[str, float]]] = {label: [] for label, _ in trees}
    for _ in range(rounds):
        for label, tree in trees:  # interleaved: one child per round and tree
            child = subprocess.run(
                [sys.executable, "-c", "import runpy, sys; sys.argv = sys.argv[:1] + "
                 f"['--part', 'zone-round', '--calls', '{calls}', '--zone', '{size}']; "
                 f"runpy.run_path({str(Path(__file__).resolve())!r}, run_name='__main__')"],
                cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True,
                text=True, timeout=900, check=False)
            if child.returncode != 0:
                raise SystemExit(f"the round in {tree} failed: {child.stderr.strip()}")
            results[label].append(json.loads(child.stdout))
    print(f"## The zones per issuance and per answer ({size:,} certificates published), "
          f"CPU time, median of {rounds} interleaved rounds of {calls}\n")
    print("| step | " + " | ".join(label for label, _ in trees) + " |")
    print("|---|" + "---|" * len(trees))
    for step in ZONE_STEPS:
        cells = [statistics.median(r[step] for r in results[label]) * 1e6
                 for label, _ in trees]
        print(f"| {step} | " + " | ".join(f"{c:,.0f} µs" for c in cells) + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dnssec",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "rrsig", "zone", "zone-round"),
                        default="all")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median)")
    parser.add_argument("--calls", type=int, default=200,
                        help="issuances (signed, or published and asked for) per round")
    parser.add_argument("--zone", type=int, default=1000,
                        help="certificates published before the zone part times anything")
    parser.add_argument("--against", type=Path, default=None,
                        help="another source tree to run the zone part in, in turn")
    args = parser.parse_args(argv)
    if args.part == "zone-round":  # the child of zone_part
        print(json.dumps(zone_round(args.zone, args.calls)))
        return 0
    if args.against is not None and not (args.against / "handlers" / "dns").is_dir():
        parser.error(f"--against {args.against}: not a TrustChain source tree")
    if args.part in ("all", "rrsig"):
        rrsig_part(args.rounds, args.calls)
    if args.part in ("all", "zone"):
        if args.part == "all":
            print()
        zone_part(args.rounds, args.calls, args.zone, args.against)
    return 0


if __name__ == "__main__":
    sys.exit(main())
