"""``trustchain verify``: what a client can check about a certificate, and nothing more.

Each check ends ``OK``, ``FAIL`` or ``UNCHECKED`` (with why and how to check it); the
last line says what was checked. The command exits with 0 only if every check passed,
or if the only ones not done are those the user accepted by name: ``--allow-unchecked-sct``
(no CT log key) and ``--offline`` (revocation not asked of a node). A failed check, or
a check not done and not accepted, exits with 1; a missing file with 2; a node that
cannot be reached with 3.

::

    trustchain verify creds/cert.pem --online     # chain, SCT, ca.validate of the node
    trustchain verify creds/cert.pem --offline    # chain, SCT; revocation accepted unchecked
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

import stoq

from ._cli_common import Command, Subcommands, offline_command, read_certificates, run_client
from ._cli_consensus import COMMIT_FILE, block_holds, check_commit, read_json
from ._cli_ct import check_embedded_scts, log_keys


@dataclass
class Report:
    """The outcome of each check, in the order they ran."""

    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    unchecked: dict[str, str] = field(default_factory=dict)
    """Check name to why it was not done."""

    def ok(self, check: str, line: str) -> None:
        self.passed.append(check)
        print(f"OK {check}: {line}")

    def fail(self, check: str, line: str) -> None:
        self.failed.append(check)
        print(f"FAIL {check}: {line}")

    def skip(self, check: str, why: str, accept: str) -> None:
        self.unchecked[check] = accept
        print(f"UNCHECKED {check}: {why}")

    def verdict(self, accepted: set[str]) -> int:
        """Print the last line; the exit status."""
        if self.failed:
            print(f"NOT OK: failed: {', '.join(self.failed)}")
            return 1
        refused = [c for c in self.unchecked if c not in accepted]
        if refused:
            how = "; ".join(f"{self.unchecked[c]} accepts {c} unchecked" for c in refused)
            print(f"NOT VERIFIED: not checked: {', '.join(refused)} ({how})")
            return 1
        line = f"OK checked: {', '.join(self.passed)}"
        if self.unchecked:
            line += f"; NOT checked, as allowed: {', '.join(self.unchecked)}"
        print(line)
        return 0


def add_commands(sub: Subcommands) -> dict[str, Command]:
    verify = sub.add_parser("verify", help="check a certificate: chain, SCT, and (--online) "
                                           "its status at a node")
    verify.add_argument("certificate", help="PEM certificate (cert.pem)")
    verify.add_argument("--cafile", help="root certificate (default DATA/root.pem); with "
                                         "--online it also authenticates the node")
    verify.add_argument("--chain", help="intermediates (default chain.pem beside the cert)")
    verify.add_argument("--data-dir", default=None,
                        help="where root.pem and ct/*/log-key.pem are (default "
                             "./trustchain-data)")
    verify.add_argument("--log-key", action="append", metavar="PEM",
                        help="CT log public key (default DATA/ct/*/log-key.pem; repeatable)")
    verify.add_argument("--allow-unchecked-sct", action="store_true",
                        help="exit 0 even when no CT log key was there to check the SCT")
    verify.add_argument("--consensus", action="store_true",
                        help="also check the commit of the block that committed the "
                             "certificate: signatures of more than 2/3 of the power")
    verify.add_argument("--commit", metavar="FILE",
                        help=f"the commit (default {COMMIT_FILE} beside the cert, as "
                             "`trustchain issue` writes it)")
    verify.add_argument("--validators", metavar="FILE",
                        help="the validator set of the commit's height, as `trustchain "
                             "consensus validators --height H` prints it (default with "
                             "--online: asked of the node)")
    mode = verify.add_mutually_exclusive_group()
    mode.add_argument("--online", action="store_true",
                      help="also ask a node (ca.validate) whether the certificate is "
                           "valid, revoked or expired; the log keys come from it when "
                           "none is given")
    mode.add_argument("--offline", action="store_true",
                      help="do not ask a node: accept that revocation (and with "
                           "--consensus, the block's content) is not checked")
    verify.add_argument("--server", default="[::1]:8443", metavar="[ADDR]:PORT",
                        help="the node --online asks (default [::1]:8443)")
    trust = verify.add_mutually_exclusive_group()
    trust.add_argument("--pin", metavar="SHA256",
                       help="authenticate the node by this certificate SHA-256 instead of "
                            "the root")
    trust.add_argument("--insecure", action="store_true",
                       help="do not authenticate the node (development only)")
    verify.add_argument("--engine", choices=stoq.ENGINES, default=stoq.DEFAULT_ENGINE)
    verify.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for the node (default 10)")
    return {"verify": offline_command(cmd_verify)}


def verify_certificate(cert_path: Path, root_path: Path, chain_path: Path | None,
                       at: datetime.datetime | None = None) -> list[str]:
    """Check ``cert_path`` chains to the root in ``root_path``; return what is wrong."""
    certs = read_certificates(cert_path)
    leaf, intermediates = certs[0], certs[1:]
    if chain_path is not None:
        intermediates += read_certificates(chain_path)
    roots = read_certificates(root_path)
    store = verification.Store(roots)
    builder = verification.PolicyBuilder().store(store).time(
        at or datetime.datetime.now(datetime.UTC))
    verifier = builder.build_client_verifier()
    try:
        verifier.verify(leaf, [c for c in intermediates if c not in roots])
    except verification.VerificationError as exc:
        return [f"chain does not verify: {exc}"]
    return []


def _when(ts: int) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _check_sct(report: Report, leaf: x509.Certificate, issuer: x509.Certificate | None,
               keys: dict[bytes, tuple[str, Any]]) -> None:
    problems, lines, unchecked = check_embedded_scts(leaf, issuer, keys)
    for line in lines:
        print(line)
    if problems:
        for problem in problems:
            report.fail("SCT", problem)
    elif unchecked is not None:
        report.skip("SCT", unchecked, "--allow-unchecked-sct")
    else:
        report.passed.append("SCT")


def cmd_verify(args: argparse.Namespace) -> int:
    root = Path(args.cafile or Path(args.data_dir or "./trustchain-data") / "root.pem")
    if not root.is_file():
        print(f"error: no root certificate at {root}; pass --cafile", file=sys.stderr)
        return 2
    cert_path = Path(args.certificate)
    chain = Path(args.chain) if args.chain else None
    if chain is None and (cert_path.parent / "chain.pem").is_file():
        chain = cert_path.parent / "chain.pem"
    leaf = read_certificates(cert_path)[0]
    print(f"serial {format(leaf.serial_number, 'x')}")
    print(f"valid {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} to "
          f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    report = Report()
    problems = verify_certificate(cert_path, root, chain)
    if problems:  # nothing else means anything for a certificate the root did not issue
        for problem in problems:
            report.fail("chain", problem)
        return report.verdict(set())
    report.ok("chain", f"chains to {root}, within its validity period")
    chain_certs = read_certificates(chain) if chain else []
    issuer = next((c for c in chain_certs if c.subject == leaf.issuer), None)
    keys = log_keys(args.log_key or [], args.data_dir)
    accepted = {"SCT"} if args.allow_unchecked_sct else set()
    der = leaf.public_bytes(serialization.Encoding.DER)
    commit = _read_commit(args, cert_path, der) if args.consensus else None
    validators = read_json(Path(args.validators), "validator set") if args.validators else None
    if commit is not None and validators is None and not args.online:
        print("error: --consensus needs the validator set: --validators FILE (from "
              "`trustchain consensus validators --height "
              f"{commit['block_height']}`) or --online", file=sys.stderr)
        return 2
    if not args.online:
        _check_sct(report, leaf, issuer, keys)
        report.skip("revocation", "no node was asked (--online asks one with ca.validate)",
                    "--offline")
        if commit is not None and validators is not None:
            _check_commit(report, commit, validators, str(args.validators))
            report.skip("block", "that the committed block holds this certificate needs "
                                 "the block (--online asks consensus.blocks)", "--offline")
        if args.offline:
            accepted |= {"revocation", "block"}
        return report.verdict(accepted)

    server_args = copy.copy(args)  # the node is authenticated by --pin, or by the root
    server_args.cafile = None if args.pin or args.insecure else str(root)

    async def ask(client: stoq.AsyncClient) -> int:
        log_keys_used = keys
        if not log_keys_used:
            shards = await stoq.ShardKeys.fetch(client)
            log_keys_used = {log_id: (f"shard {shard} of {args.server}", key)
                             for log_id, (shard, key) in shards.by_log_id.items()}
        _check_sct(report, leaf, issuer, log_keys_used)
        await _check_status(report, client, leaf, args.server)
        if commit is not None:
            height = commit["block_height"]
            source = str(args.validators)
            deciding = validators
            if deciding is None:
                deciding = await client.request("consensus.validators", {"height": height})
                source = f"{args.server} (consensus.validators)"
            _check_commit(report, commit, deciding, source)
            blocks = await client.request("consensus.blocks", {"start": height, "limit": 1})
            found = blocks["blocks"][0]["block"] if blocks["blocks"] else b""
            why = block_holds(found, bytes.fromhex(commit["block_hash"]), commit["index"], der)
            if why is None:
                report.ok("block", f"block {height} from {args.server} is the committed "
                                   f"block, and its decision {commit['index']} carries this "
                                   "certificate")
            else:
                report.fail("block", why)
        return report.verdict(accepted)

    return run_client(server_args, ask)


def _read_commit(args: argparse.Namespace, cert_path: Path, der: bytes) -> dict[str, Any]:
    """The commit file of this certificate.

    :raises ValueError: it is malformed or another certificate's.
    """
    path = Path(args.commit) if args.commit else cert_path.parent / COMMIT_FILE
    commit = read_json(path, "commit")
    if commit.get("fingerprint") != hashlib.sha256(der).hexdigest():
        raise ValueError(f"{path} is the commit of another certificate (fingerprint "
                         f"{commit.get('fingerprint')})")
    return commit


def _check_commit(report: Report, commit: dict[str, Any], validators: dict[str, Any],
                  source: str) -> None:
    try:
        checked = check_commit(commit, validators)
    except ValueError as exc:
        report.fail("consensus", f"the commit of block {commit.get('block_height')}: {exc}")
        return
    report.ok("consensus", f"block {checked.height} ({checked.block_hash.hex()[:16]}...), "
                           f"round {checked.round}: signed by {checked.signers} validators "
                           f"holding {checked.power} of {checked.total_power} power (more "
                           f"than 2/3; validator set from {source})")


async def _check_status(report: Report, client: stoq.AsyncClient, leaf: x509.Certificate,
                        server: str) -> None:
    """``ca.validate``: the node's status of this very certificate (same DER)."""
    serial = format(leaf.serial_number, "x")
    result = await client.request("ca.validate", {"serial": serial})
    status = result["status"]
    if status != "unknown" and result.get("certificate") != leaf.public_bytes(
            serialization.Encoding.DER):
        report.fail("revocation", f"{server} knows serial {serial} as another certificate")
    elif status == "valid":
        report.ok("revocation", f"{server} says valid (ca.validate): not revoked")
    elif status == "revoked":
        report.fail("revocation", f"{server} says revoked at {_when(result['revoked_at'])} "
                                  f"({result['reason']})")
    else:
        report.fail("revocation", f"{server} says {status} (ca.validate)")
