"""CT commands of the ``trustchain`` CLI: ``ct watch``, ``ct proof``, ``ct sth``, ``ct check``.

``trustchain ct watch [--from N] [--domain SUFFIX]...`` prints the log's
entries as they are sequenced, one line each, and resumes by itself after a
``resume`` event or a lost connection. ``trustchain ct proof CERT`` proves
that a certificate is in the log (embedded SCT, inclusion proof against a
verified tree head). ``trustchain ct check`` reads a node's data directory and
verifies every tile of every shard against the committed tree.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

import stoq
from protocol import ct_structs as ct
from store import TileCorrupted

from . import _config as config
from ._cli_common import (
    ClientBody,
    Command,
    Subcommands,
    add_trust_options,
    client_command,
    offline_command,
    parse_endpoint,
    read_certificates,
    run_client,
    trust_arguments,
)
from ._compose import data_directory


def add_commands(sub: Subcommands) -> dict[str, Command]:
    parser = sub.add_parser("ct", help="the Certificate Transparency log")
    commands = parser.add_subparsers(dest="ct_command", required=True)
    watch = commands.add_parser("watch", help="print log entries live (resumes by itself)")
    watch.add_argument("--from", dest="start", type=int, default=None, metavar="N",
                       help="start at index N (default: new entries only)")
    watch.add_argument("--domain", action="append", default=[], metavar="SUFFIX",
                       help="only entries with a name equal to or under SUFFIX (repeatable)")
    watch.add_argument("--shard", type=int, default=None, help="shard (default: the active)")
    watch.add_argument("--count", type=int, default=None,
                       help="stop after printing this many entries")
    watch.add_argument("--no-verify", action="store_true",
                       help="do not verify tree heads")
    add_trust_options(watch)
    proof = commands.add_parser("proof", help="prove that a certificate is in the log")
    proof.add_argument("certificate", help="PEM certificate (cert.pem)")
    proof.add_argument("--chain", help="PEM issuer chain (default chain.pem beside the cert)")
    add_trust_options(proof)
    sth = commands.add_parser("sth", help="the latest signed tree head, verified")
    sth.add_argument("--shard", type=int, default=None)
    add_trust_options(sth)
    check = commands.add_parser(
        "check", help="verify every tile of a node's CT log against its committed tree "
                      "(reads the data directory; slow for large logs)")
    check.add_argument("--config", help="the node's configuration (default: built-in)")
    check.add_argument("--data-dir", help="the node's data directory "
                                          "(default: node.data_dir of the configuration)")

    def command(args: argparse.Namespace) -> int:
        if args.ct_command == "watch":
            return _watch(args)
        if args.ct_command == "check":
            return offline_command(_check)(args)
        return client_command({"proof": _proof, "sth": _sth}[args.ct_command])(args)

    return {"ct": command}


def _when(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def _watch(args: argparse.Namespace) -> int:
    async def body(client: stoq.AsyncClient) -> int:
        host, port = parse_endpoint(args.server)
        trust = trust_arguments(args)

        first: list[stoq.AsyncClient] = [client]

        async def connect() -> stoq.AsyncClient:
            if first:  # the connection the command opened, then new ones
                return first.pop()
            return await stoq.connect(host, port, engine=args.engine, timeout=args.timeout,
                                      **trust)

        follower = stoq.follow_log(connect, shard=args.shard, start=args.start,
                                   domains=args.domain, verify=not args.no_verify,
                                   include_leaf=not args.domain)
        printed = 0
        async for entry in follower:
            print(f"{entry.shard}/{entry.index} {_when(entry.timestamp)} {entry.entry_type} "
                  f"{entry.fingerprint.hex()} {' '.join(entry.names)}", flush=True)
            printed += 1
            if args.count is not None and printed >= args.count:
                break
        return 0
    return run_client(args, body)


def _issuer(cert_path: Path, chain: str | None) -> x509.Certificate | None:
    certs = read_certificates(cert_path)
    chain_path = Path(chain) if chain else cert_path.parent / "chain.pem"
    if len(certs) > 1:
        return certs[1]
    if chain_path.is_file():
        return read_certificates(chain_path)[0]
    return None


def _proof(args: argparse.Namespace) -> ClientBody:
    cert_path = Path(args.certificate)
    cert = read_certificates(cert_path)[0]
    issuer = _issuer(cert_path, args.chain)

    async def body(client: stoq.AsyncClient) -> int:
        try:
            proof = await stoq.prove_certificate(client, cert, issuer)
        except stoq.LogVerificationError as exc:
            print(f"FAIL {exc.message}")
            return 1
        print(f"serial {format(cert.serial_number, 'x')}")
        if proof.sct_timestamp is not None:
            print(f"logged {_when(proof.sct_timestamp)}")
        print(f"entry {proof.shard}/{proof.leaf_index}, leaf hash {proof.leaf_hash.hex()}")
        print(f"tree size {proof.tree_size}, root {proof.root.hex()} (signature verified)")
        for i, node in enumerate(proof.audit_path):
            print(f"  audit path [{i}] {node.hex()}")
        print("OK included in the log")
        return 0
    return body


def _sth(args: argparse.Namespace) -> ClientBody:
    async def body(client: stoq.AsyncClient) -> int:
        keys = await stoq.ShardKeys.fetch(client)
        sth = await client.request("ct.get-sth", {"shard": args.shard})
        stoq.verify_sth(sth, keys.keys[sth["shard"]])
        print(f"shard {sth['shard']} tree size {sth['tree_size']} at {_when(sth['timestamp'])}")
        print(f"root {sth['sha256_root_hash'].hex()} (signature verified)")
        sys.stdout.write(sth["checkpoint"])
        return 0
    return body


def log_keys(paths: list[str], data_dir: str | None) -> dict[bytes, tuple[str, Any]]:
    """Log keys by log id: the files given, else every ``DATA/ct/<shard>/log-key.pem``."""
    files = [Path(p) for p in paths] or sorted(
        (Path(data_dir or "./trustchain-data") / "ct").glob("*/log-key.pem"))
    keys: dict[bytes, tuple[str, Any]] = {}
    for path in files:
        key = serialization.load_pem_public_key(path.read_bytes())
        keys[ct.log_id_of(key)] = (str(path), key)
    return keys


def check_embedded_scts(leaf: x509.Certificate, issuer: x509.Certificate | None,
                        keys: dict[bytes, tuple[str, Any]]
                        ) -> tuple[list[str], list[str], str | None]:
    """Offline check of a certificate's embedded SCTs: (problems, report lines, why the
    SCT could not be checked or None). No key of the SCT's log is "not checked", never
    "OK"."""
    try:
        scts = ct.embedded_scts(leaf)
    except ct.StructureError as exc:
        return [f"the SCT list does not parse: {exc}"], [], None
    if not scts:
        return ["the certificate carries no SCT: it was not logged through the "
                "precertificate flow"], [], None
    if not keys:
        return [], [], "no CT log key (DATA/ct/*/log-key.pem, --log-key PEM or --online)"
    if issuer is None:
        return ["checking the SCT needs the issuer (--chain)"], [], None
    problems: list[str] = []
    lines: list[str] = []
    unknown: list[str] = []
    for sct in scts:
        known = keys.get(sct.log_id)
        if known is None:
            unknown.append(sct.log_id.hex()[:16])
            continue
        try:
            ct.verify_embedded_sct(leaf, issuer, sct, known[1])
        except ct.SignatureError as exc:
            problems.append(f"SCT from {known[0]}: {exc}")
            continue
        lines.append(f"OK SCT of log {sct.log_id.hex()[:16]}... ({known[0]}), entry "
                     f"{sct.leaf_index}, logged {_when(sct.timestamp)}")
    if not problems and not lines:
        return [], [], (f"the SCT is from a log whose key was not given ({', '.join(unknown)}"
                        "...; --log-key PEM)")
    lines += [f"note: an SCT of log {log_id}... not checked (no key for it)"
              for log_id in unknown]
    return problems, lines, None


def _check(args: argparse.Namespace) -> int:
    """Every shard's tiles against the tree the state committed: 0 all intact, 1 damage."""
    cfg = config.load(args.config)
    data = data_directory(cfg, Path(args.data_dir or cfg.node.data_dir))
    if not data.state_path.is_file():
        print(f"error: no node state at {data.state_path} (is --data-dir right?)",
              file=sys.stderr)
        return 2
    state = data.state()
    try:
        shards = state.ct_shards()
    finally:
        state.close()
    if not shards:
        print("the CT log has no committed entries yet")
        return 0
    damaged = 0
    for number, size, root in shards:
        try:
            data.ct_tiles().shard(number).check(size, root)
        except TileCorrupted as exc:
            damaged += 1
            print(f"FAIL shard {number} ({size} entries): {exc}")
        else:
            print(f"OK shard {number}: {size} entries, root {root.hex()}, every tile verified")
    if damaged:
        print(DAMAGED_ADVICE)
    return 1 if damaged else 0


DAMAGED_ADVICE = ("what to do: stop the node and restore the damaged shard's directory from a "
                  "backup; a cluster validator can instead rebuild it from the blocks (README, "
                  "\"A cluster is one CA\": a lost data directory is rebuilt)")
