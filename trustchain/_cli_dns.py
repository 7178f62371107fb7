"""``trustchain dns ...``: ask a node's DNS service.

::

    trustchain dns query www.trust [TYPE] [--stoq]   # dns.resolve over STOQ (the default)
    trustchain dns query www.trust AAAA --doq        # DNS over QUIC with dnspython
    trustchain dns ds                                # DS records of the zones, for the parents
    trustchain dns health                            # upstreams, cache, zones (JSON)

``--doq`` sends a real DoQ query to the node's address and port (``--server``)
and checks the answer's RRSIGs against the zone's DNSKEY set, whose own
signature is checked with the KSK; compare that KSK's DS with ``trustchain
dns ds`` (or the parent zone) to anchor it. Exit status 0 when the answer is
NOERROR, 1 for any other rcode or a failed validation.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.dnssec
import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.quic._common import UnexpectedEOF  # not exported by dns.quic (dnspython 2.9)

import stoq

from ._cli_common import (
    ClientBody,
    Command,
    Subcommands,
    add_trust_options,
    client_command,
    parse_endpoint,
    readable_certificates,
)


def add_commands(sub: Subcommands) -> dict[str, Command]:
    parser = sub.add_parser("dns", help="query a node's DNS service (DoQ or STOQ)")
    commands = parser.add_subparsers(dest="dns_command", required=True)
    query = commands.add_parser("query", help="resolve NAME and show the validation status")
    query.add_argument("name")
    query.add_argument("type", nargs="?", default="AAAA", help="record type (default AAAA)")
    how = query.add_mutually_exclusive_group()
    how.add_argument("--stoq", action="store_true", help="ask with dns.resolve (default)")
    how.add_argument("--doq", action="store_true", help="ask over DNS over QUIC (RFC 9250)")
    query.add_argument("--server-name", default=None,
                       help="--doq: the name the node's certificate must carry (default: "
                            "the address of --server)")
    add_trust_options(query)
    add_trust_options(commands.add_parser("ds", help="DS records of the TrustChain zones"))
    add_trust_options(commands.add_parser("health", help="the DNS service's health (JSON)"))

    def command(args: argparse.Namespace) -> int:
        if args.dns_command == "query" and args.doq:
            return _query_doq(args)
        make = {"query": _query_stoq, "ds": _ds, "health": _health}[args.dns_command]
        return client_command(make)(args)

    return {"dns": command}


def _query_stoq(args: argparse.Namespace) -> ClientBody:
    async def body(client: stoq.AsyncClient) -> int:
        result = await client.request("dns.resolve", {"name": args.name, "type": args.type})
        for record in result["answer"]:
            print(f"{record['name']} {record['ttl']} IN {record['type']} {record['data']}")
        if not result["answer"]:
            for record in result["authority"]:
                print(f";; authority: {record['name']} {record['ttl']} IN {record['type']} "
                      f"{record['data']}")
        where = "authoritative" if result["authoritative"] else result["source"]
        print(f";; rcode {result['rcode']} ({where}), dnssec {result['dnssec']}")
        tlsa = result.get("tlsa")
        if tlsa:
            print(f";; tlsa {tlsa['name']}: {tlsa['status']}"
                  + (f" (certificate {tlsa['serial']})" if tlsa["serial"] else ""))
        ok = result["rcode"] == "NOERROR" and result["dnssec"] != "bogus"
        return 0 if ok else 1
    return body


def _ds(args: argparse.Namespace) -> ClientBody:
    async def body(client: stoq.AsyncClient) -> int:
        health = await client.request("dns.health")
        for zone in health["zones"]:
            for line in zone["ds"]:
                print(line)
        return 0
    return body


def _health(args: argparse.Namespace) -> ClientBody:
    async def body(client: stoq.AsyncClient) -> int:
        print(json.dumps(await client.request("dns.health"), indent=2, sort_keys=True))
        return 0
    return body


def _query_doq(args: argparse.Namespace) -> int:
    try:
        host, port = parse_endpoint(args.server)
        if args.pin:
            raise ValueError("--doq verifies the certificate with --cafile; --pin is not "
                             "supported by the DoQ client")
        verify: bool | str = False if args.insecure else readable_certificates(
            args.cafile or _default_root(args))
        rdtype = dns.rdatatype.from_text(args.type)
        name = dns.name.from_text(args.name)
    except (ValueError, dns.exception.DNSException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server_name = args.server_name or host

    def ask(qname: dns.name.Name, qtype: Any) -> dns.message.Message:
        query = dns.message.make_query(qname, qtype, want_dnssec=True)
        return dns.query.quic(query, host, port=port, verify=verify,
                              server_hostname=server_name, timeout=args.timeout)

    try:
        response = ask(name, rdtype)
    except (dns.exception.DNSException, OSError, EOFError, UnexpectedEOF) as exc:
        why = f"{type(exc).__name__} {exc}".strip()
        if isinstance(exc, UnexpectedEOF):  # dnspython's word for a connection that never was
            why = f"no DoQ connection within {args.timeout} s"
        print(f"error: cannot reach [{host}]:{port} over DoQ: {why}", file=sys.stderr)
        return 3
    for rrset in response.answer:
        if rrset.rdtype != dns.rdatatype.RRSIG:
            print(rrset.to_text())
    if not response.answer:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA:
                print(f";; authority: {rrset.to_text()}")
    flags = dns.flags.to_text(response.flags)
    status = validate_doq(response, ask)
    rcode = response.rcode()
    if status == "secure" and compact_nxdomain(response, name):
        rcode = dns.rcode.NXDOMAIN  # RFC 9824 §4: a validated compact denial of the name
    print(f";; rcode {dns.rcode.to_text(rcode)}, flags {flags}, dnssec {status}")
    ok = rcode == dns.rcode.NOERROR and status != "bogus"
    return 0 if ok else 1


NXNAME = 128


def compact_nxdomain(response: dns.message.Message, name: dns.name.Name) -> bool:
    """Whether ``response`` is a compact denial (RFC 9824) that ``name`` exists: NOERROR
    with an NSEC at ``name`` whose type bitmap lists NXNAME."""
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.NSEC and rrset.name == name:
            for window, bitmap in rrset[0].windows:
                if window == 0 and len(bitmap) > NXNAME // 8 and \
                        bitmap[NXNAME // 8] & (0x80 >> NXNAME % 8):
                    return True
    return False


def _default_root(args: argparse.Namespace) -> str:
    root = Path(args.data_dir or "./trustchain-data") / "root.pem"
    if not root.is_file():
        raise ValueError(f"no trust anchor: pass --cafile FILE or --insecure (looked for {root})")
    return str(root)


def validate_doq(response: dns.message.Message,
                  ask: Callable[[dns.name.Name, Any], dns.message.Message]) -> str:
    """``secure`` (every RRset signed by the zone's DNSKEY set, which its KSK signed),
    ``bogus``, or ``unsigned`` (no RRSIG at all: a forwarded answer)."""
    sections = response.answer + response.authority
    sigs = [r for r in sections if r.rdtype == dns.rdatatype.RRSIG]
    if not sigs:
        return "unsigned"
    signer = sigs[0][0].signer
    try:
        keys_message = ask(signer, dns.rdatatype.DNSKEY)
        dnskeys = keys_message.find_rrset(keys_message.answer, signer, dns.rdataclass.IN,
                                          dns.rdatatype.DNSKEY)
        key_sig = keys_message.find_rrset(keys_message.answer, signer, dns.rdataclass.IN,
                                          dns.rdatatype.RRSIG, dns.rdatatype.DNSKEY)
        ksk = [k for k in dnskeys if k.flags & 1]
        anchors: dict[dns.name.Name, Any] = {
            signer: dns.rrset.from_rdata_list(signer, dnskeys.ttl, ksk)}
        dns.dnssec.validate(dnskeys, key_sig, anchors)
        keys: dict[dns.name.Name, Any] = {signer: dnskeys}
        by_type = {(r.name, r.covers): r for r in sigs}
        for rrset in sections:
            if rrset.rdtype != dns.rdatatype.RRSIG:
                dns.dnssec.validate(rrset, by_type[(rrset.name, rrset.rdtype)], keys)
    except (KeyError, dns.exception.DNSException):
        return "bogus"
    return "secure"
