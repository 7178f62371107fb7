"""CA commands of the ``trustchain`` CLI: init, issue, validate, revoke, audit."""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

import stoq
from handlers.ca import revocation_statement
from store import AuditReport, ObjectStoreError, verify_archive, verify_log, write_atomic

from . import _config as config
from ._cli_common import ClientBody, read_certificates, read_private_key
from ._cli_consensus import write_commit
from ._cli_proofs import guarded, proofs_dir, ready_prover
from ._compose import (
    data_directory,
    locked_bucket,
    open_ca,
    open_ca_stores,
    open_configured_keystore,
)


def load_or_create_key(path: Path, key_type: str) -> Any:
    """The private key in ``path``; a new one (mode 0600) if the file does not exist."""
    key: Any
    if path.exists():
        key = read_private_key(path)
        if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
            raise ValueError(f"{path}: only EC (P-256, P-384) and Ed25519 keys are supported")
        return key
    if key_type == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = ec.generate_private_key(ec.SECP384R1() if key_type == "p384" else ec.SECP256R1())
    write_atomic(path, key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()), mode=0o600)
    print(f"created a new {key_type} key in {path}", file=sys.stderr)
    return key


def sign_statement(key: Any, data: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    digest = hashes.SHA384() if key.curve.key_size == 384 else hashes.SHA256()
    return bytes(key.sign(data, ec.ECDSA(digest)))


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def _when(ts: int) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- init -------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    data = data_directory(cfg, Path(args.data_dir or cfg.node.data_dir).resolve())
    with open_ca_stores(cfg, data) as stores:
        stores.audit.append("ca.init", {"config": cfg.source})
        existed = stores.authorities.active_authority("root") is not None
        hierarchy = open_ca(cfg, data, stores.keystore, stores.authorities, stores.audit,
                            create=True)
        admin = hierarchy.ensure_admin()
        assert hierarchy.root is not None and hierarchy.issuer is not None
        fingerprint = hierarchy.root.fingerprint(hashes.SHA256()).hex()
        print(("CA already initialised in " if existed else "initialised a new CA in ")
              + str(data.root))
        print(f"root certificate {hierarchy.root_file} sha256 {fingerprint}")
        print(f"issuing intermediate {hierarchy.issuer.name} "
              f"(keys in the {stores.keystore.kind} keystore)")
        print(f"administrator credential {admin.certificate}, {admin.key}")
    return 0


# --- client commands ----------------------------------------------------------------


def cmd_issue(args: argparse.Namespace) -> ClientBody:
    if not args.names and not args.ipv6:
        raise ValueError("give at least one NAME or --ipv6 ADDR")
    key = load_or_create_key(Path(args.key), args.key_type)
    csr = stoq.build_csr(key, list(args.names), list(args.ipv6 or []))

    async def body(client: stoq.AsyncClient) -> int:
        # the four-proof set: made from the requester's proof directory (spec §17)
        prover = await ready_prover(client, proofs_dir(args))
        result = await client.request("ca.issue", {
            "csr": csr, "proofs": await prover.for_issue(client, csr)})
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "cert.pem", _pem(result["certificate"]))
        write_atomic(out / "chain.pem", b"".join(_pem(d) for d in result["chain"]))
        commit = write_commit(out, result)
        print(f"serial {result['serial']}")
        print(f"names {' '.join(result['names'])}")
        print(f"valid {_when(result['not_before'])} to {_when(result['not_after'])}; "
              f"renew after {_when(result['renew_after'])}")
        print(f"wrote {out / 'cert.pem'} and {out / 'chain.pem'}"
              + (f", and the block's commit to {commit}" if commit else ""))
        return 0
    return guarded(body)


def cmd_validate(args: argparse.Namespace) -> ClientBody:
    async def body(client: stoq.AsyncClient) -> int:
        result = await client.request("ca.validate", {"serial": args.serial})
        print(f"serial {result['serial']}: {result['status']}")
        if result["status"] != "unknown":
            print(f"names {' '.join(result['names'])}")
            print(f"valid {_when(result['not_before'])} to {_when(result['not_after'])}")
            print(f"sha256 {result['fingerprint']}")
        if result["status"] == "revoked":
            print(f"revoked {_when(result['revoked_at'])} ({result['reason']})")
        return 0 if result["status"] == "valid" else 1
    return body


def cmd_revoke(args: argparse.Namespace) -> ClientBody:
    serial = args.serial.lower()
    normalised = serial.strip().lstrip("0") or "0"
    request: dict[str, Any] = {"serial": serial, "reason": args.reason}
    if args.admin:
        directory = Path(args.admin)
        key = read_private_key(directory / "admin.key")
        cert = read_certificates(directory / "admin.pem")[0]
        request["admin_certificate"] = cert.public_bytes(serialization.Encoding.DER)
    elif args.key:
        key = read_private_key(args.key)
    else:
        raise ValueError("give --key KEYFILE (the certificate's key) or --admin DIR")

    async def body(client: stoq.AsyncClient) -> int:
        # proofs first: a first plot or VDF may take a while, and the statement's
        # time must be within 300 s of the server's clock when it arrives
        prover = await ready_prover(client, proofs_dir(args))
        now = int(time.time())
        request["time"] = now
        request["signature"] = sign_statement(key, revocation_statement(normalised,
                                                                         args.reason, now))
        request["proofs"] = await prover.for_revoke(client, normalised, args.reason, now)
        result = await client.request("ca.revoke", request)
        state = "was already revoked" if result["already_revoked"] else "revoked"
        print(f"serial {result['serial']} {state} at {_when(result['revoked_at'])} "
              f"({result['reason']})")
        return 0
    return guarded(body)


def cmd_rotation_status(args: argparse.Namespace) -> ClientBody:
    async def body(client: stoq.AsyncClient) -> int:
        result = await client.request("ca.rotation-status")
        for item in result["intermediates"]:
            mark = "*" if item["active"] else " "
            print(f"{mark} {item['name']}: valid to {_when(item['not_after'])}")
        print(f"next intermediate rotation {_when(result['intermediate_renew_at'])}")
        server = result.get("server_certificate")
        if server:
            print(f"node certificate {server['serial']}: valid to {_when(server['not_after'])},"
                  f" renewal at {_when(server['renew_at'])}")
        print(f"issued {result['issued']}, rejected {result['rejected']}")
        return 0
    return body


# --- offline ----------------------------------------------------------------------------


def cmd_audit_verify(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    data_dir = Path(args.data_dir or cfg.node.data_dir)
    path = data_directory(cfg, data_dir).audit_path
    if args.from_s3:
        return _audit_verify_s3(cfg, data_dir, path)
    if not path.is_file():
        print(f"error: no audit log at {path}", file=sys.stderr)
        return 2
    report = verify_log(path, public_keys=_audit_keys(cfg, data_dir))
    last = ("none" if report.last_checkpoint_seq is None
            else f"record {report.last_checkpoint_seq}")
    print(f"{report.records} records; last signed checkpoint: {last}")
    return _print_audit_report(report)


def _audit_keys(cfg: config.Config, data_dir: Path) -> list[Any] | None:
    """The audit key's public key from the node's keystore (None without one: then
    each checkpoint is checked against the key it names)."""
    if not data_dir.is_dir():
        return None
    keystore = open_configured_keystore(cfg, data_dir)  # only to read the audit key
    try:
        signer = keystore.get("audit")
        return [signer.public_key()] if signer is not None else None
    finally:
        keystore.close()


def _audit_verify_s3(cfg: config.Config, data_dir: Path, local: Path) -> int:
    """``audit verify --from-s3``: the whole chain from the bucket's segments alone,
    then the local log compared with it."""
    storage = cfg.audit.storage
    if not storage.bucket:
        print(f"error: {cfg.source} sets no audit.storage.bucket to verify",
              file=sys.stderr)
        return 2
    try:
        bucket = locked_bucket(storage)
        report = verify_archive(bucket, public_keys=_audit_keys(cfg, data_dir),
                                local=local)
    except ObjectStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    last = ("none" if report.last_checkpoint_seq is None
            else f"record {report.last_checkpoint_seq}")
    print(f"{bucket.location}: {report.records} records in {report.segments} segments; "
          f"last signed checkpoint: {last}")
    for line in report.local:
        print(line)
    return _print_audit_report(report)


def _print_audit_report(report: AuditReport) -> int:
    tail = report.unsigned_range()
    if tail is not None:
        first, end = tail
        span = f"record {first}" if first == end else f"records {first}-{end}"
        print(f"unsigned tail: {report.unsigned_tail} (no checkpoint covers {span} yet; a "
              "running node signs them within audit.checkpoint_interval)")
    elif report.unsigned_tail:
        print(f"unsigned tail: {report.unsigned_tail} lines after the last checkpoint")
    else:
        print("unsigned tail: none (every record is covered by a signed checkpoint)")
    for warning in report.warnings:
        print(f"warning: {warning}")
    for problem in report.problems:
        print(f"FAIL {problem}")
    print("OK" if report.ok else "TAMPERED")
    return 0 if report.ok else 1
