"""``trustchain demo``: the whole CA in one command, for a first look.

It starts a throwaway node (``trustchain serve`` in a temporary directory, on a
free port of ``[::1]``), then, as a client would: builds the four proofs
(space, stake, work, time), has a certificate issued and checks the block's
commit, checks its SCT and its inclusion in the CT log, resolves its name over
DNS over QUIC with DNSSEC and the TLSA match, revokes it, sees ``ca.validate``
say so, and stops the node. One line a step, with its time; exit status 0 only
if every step checked out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rdatatype
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import stoq
from protocol import TrustChainError, revocation_statement

from ._cli_ca import sign_statement
from ._cli_common import Command, Subcommands
from ._cli_consensus import check_commit
from ._cli_ct import check_embedded_scts
from ._cli_dns import validate_doq
from ._cli_proofs import ready_prover

NAME = "demo.hypermesh"
ADDRESS = "2001:db8::d"
NODE_START_TIMEOUT = 120.0
"""Seconds for the node's first start (it makes its CA and its own certificate)."""


def add_commands(sub: Subcommands) -> dict[str, Command]:
    demo = sub.add_parser("demo", help="start a throwaway node and show the whole CA at "
                                       "work: four proofs, issue, CT, DoQ + DNSSEC, revoke")
    demo.add_argument("--keep", action="store_true",
                      help="keep the temporary directory (node data, log, proofs, keys)")
    return {"demo": cmd_demo}


class DemoFailed(Exception):
    """A step did not check out; the message says which and why."""


@dataclass
class Node:
    """The throwaway ``trustchain serve``."""

    proc: subprocess.Popen[str]
    port: int
    root: Path
    log: Path


class Steps:
    """Prints each step as ``[  5.15 s  +0.45] what``: the time since the demo started,
    and what the step took."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()

    def say(self, text: str) -> None:
        now = time.perf_counter()
        print(f"[{now - self.start:6.2f} s {now - self.last:+6.2f}] {text}", flush=True)
        self.last = now


def cmd_demo(args: argparse.Namespace) -> int:
    steps = Steps()
    with _workspace(args.keep) as tmp:
        try:
            node = _start_node(tmp)
        except DemoFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        try:
            steps.say(f"node started on [::1]:{node.port} (pid {node.proc.pid}; data, log "
                      f"and keys in {tmp})")
            uvloop.run(_client_steps(tmp, node, steps))
        except (DemoFailed, TrustChainError, stoq.ProverError) as exc:
            print(f"FAIL {exc}", flush=True)
            print(f"(node log: {node.log})" if args.keep else "(--keep keeps the node log)")
            return 1
        finally:
            _stop(node)
        steps.say("node stopped; the temporary directory "
                  + (f"is kept: {tmp}" if args.keep else "is removed"))
    print("OK every step checked out")
    return 0


@contextlib.contextmanager
def _workspace(keep: bool) -> Iterator[Path]:
    if keep:
        yield Path(tempfile.mkdtemp(prefix="trustchain-demo-"))
        return
    with tempfile.TemporaryDirectory(prefix="trustchain-demo-") as tmp:
        yield Path(tmp)


def _start_node(tmp: Path) -> Node:
    """``trustchain serve`` on a free port; returns once it announced itself."""
    log = tmp / "node.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trustchain", "serve", "--data-dir", str(tmp / "data"),
             "--listen", "[::1]:0"], stdout=subprocess.PIPE, stderr=log_file, text=True,
            cwd=tmp, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    port = 0
    deadline = time.monotonic() + NODE_START_TIMEOUT
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            proc.wait(10)
            tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise DemoFailed(f"the node did not start (exit status {proc.returncode}): "
                             f"{tail[0]}")
        if m := re.match(r"listening on \[.*\]:(\d+)", line):
            port = port or int(m.group(1))
        if line.startswith("data directory"):
            return Node(proc=proc, port=port, root=tmp / "data" / "root.pem", log=log)
    proc.kill()
    proc.wait(10)
    raise DemoFailed(f"the node did not start within {NODE_START_TIMEOUT:.0f} s")


def _stop(node: Node) -> None:
    if node.proc.poll() is None:
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(20)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait(10)
    if node.proc.stdout is not None:
        node.proc.stdout.close()


async def _client_steps(tmp: Path, node: Node, steps: Steps) -> None:
    client = await stoq.connect("::1", node.port, cafile=str(node.root), timeout=60.0)
    async with client:
        # the four proofs: a requester key with stake (the development faucet), a
        # one-time plot (space), this epoch's VDF (time); work is made per request
        noise = io.StringIO()
        prover = await ready_prover(client, tmp / "proofs", out=noise)
        beacon = await prover.beacon(client)
        steps.say(f"proofs ready: requester key {prover.key_id[:16]}..., stake "
                  f"{await prover.stake(client)}, k={beacon.params.plot_size} plot, epoch "
                  f"{beacon.epoch} VDF of {beacon.params.vdf_iterations:,} iterations")

        key = ec.generate_private_key(ec.SECP256R1())
        csr = stoq.build_csr(key, [NAME], [ADDRESS])
        result = await client.request("ca.issue", {
            "csr": csr, "proofs": await prover.for_issue(client, csr)})
        cert = x509.load_der_x509_certificate(result["certificate"])
        issuer = x509.load_der_x509_certificate(result["chain"][0])
        serial = result["serial"]
        validators = await client.request("consensus.validators",
                                          {"height": result["block_height"]})
        try:
            committed = check_commit(result, validators)
        except ValueError as exc:
            raise DemoFailed(f"the issuance's commit: {exc}") from None
        steps.say(f"issued {serial} for {NAME} {ADDRESS} with the four proofs; block "
                  f"{committed.height} signed by {committed.signers} of "
                  f"{len(validators['validators'])} validator(s), "
                  f"{committed.power}/{committed.total_power} power (verified)")

        keys = await stoq.ShardKeys.fetch(client)
        problems, _, unchecked = check_embedded_scts(
            cert, issuer, {log_id: (f"shard {shard}", k)
                           for log_id, (shard, k) in keys.by_log_id.items()})
        if problems or unchecked is not None:
            raise DemoFailed(f"the SCT: {problems[0] if problems else unchecked}")
        proof = await _prove(client, cert, issuer)
        steps.say(f"CT: SCT verified; entry {proof.shard}/{proof.leaf_index} included in the "
                  f"signed tree head of size {proof.tree_size} (inclusion proof verified)")

        spki = hashlib.sha256(cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        ).hexdigest()
        answer = await asyncio.to_thread(_resolve, node, spki)
        steps.say(f"DoQ [::1]:{node.port}: {NAME} AAAA {answer}; DNSSEC secure; TLSA "
                  "_443._quic matches the certificate's key")

        now = int(time.time())
        reason = "superseded"
        proofs = await prover.for_revoke(client, serial, reason, now)
        revoked = await client.request("ca.revoke", {
            "serial": serial, "reason": reason, "time": now, "proofs": proofs,
            "signature": sign_statement(key, revocation_statement(serial, reason, now))})
        steps.say(f"revoked {serial} ({revoked['reason']}), signed with the certificate's "
                  f"own key, with a new proof set; block {revoked['block_height']}")
        status = await client.request("ca.validate", {"serial": serial})
        if status["status"] != "revoked":
            raise DemoFailed(f"ca.validate says {status['status']} after the revocation")
        steps.say(f"ca.validate {serial}: revoked")


async def _prove(client: stoq.AsyncClient, cert: x509.Certificate,
                 issuer: x509.Certificate) -> Any:
    """The inclusion proof, once the log's tree head includes the new entry."""
    last: TrustChainError | None = None
    for _ in range(50):
        try:
            return await stoq.prove_certificate(client, cert, issuer)
        except TrustChainError as exc:
            last = exc
            await asyncio.sleep(0.2)
    raise DemoFailed(f"CT inclusion: {last}")


def _resolve(node: Node, spki: str) -> str:
    """The AAAA of :data:`NAME` over DoQ, DNSSEC-validated, and its TLSA checked against
    ``spki`` (the certificate key's SHA-256); retried while the zone catches up."""
    def ask(name: Any, rdtype: Any) -> dns.message.Message:
        qname = dns.name.from_text(name) if isinstance(name, str) else name
        return dns.query.quic(dns.message.make_query(qname, rdtype, want_dnssec=True),
                              "::1", port=node.port, verify=str(node.root),
                              server_hostname="::1", timeout=10)

    why = "no answer"
    for _ in range(50):
        try:
            aaaa = ask(NAME, dns.rdatatype.AAAA)
            tlsa = ask(f"_443._quic.{NAME}", dns.rdatatype.TLSA)
        except (dns.exception.DNSException, OSError) as exc:
            raise DemoFailed(f"DoQ: {type(exc).__name__} {exc}") from None
        addresses = [rd.to_text() for rrset in aaaa.answer
                     if rrset.rdtype == dns.rdatatype.AAAA for rd in rrset]
        records = [rd for rrset in tlsa.answer if rrset.rdtype == dns.rdatatype.TLSA
                   for rd in rrset]
        if addresses and records:
            for response in (aaaa, tlsa):
                status = validate_doq(response, ask)
                if status != "secure":
                    raise DemoFailed(f"DNSSEC: the answer is {status}")
            if ADDRESS not in addresses:
                raise DemoFailed(f"DoQ: AAAA {addresses}, not {ADDRESS}")
            if not any(rd.usage == 3 and rd.selector == 1 and rd.mtype == 1
                       and rd.cert.hex() == spki for rd in records):
                raise DemoFailed("TLSA: no 3 1 1 record with the certificate's key")
            return ADDRESS
        why = f"AAAA {addresses or 'none'}, TLSA {len(records)} record(s)"
        time.sleep(0.2)
    raise DemoFailed(f"DoQ: {NAME} not in the zone after 10 s ({why})")
