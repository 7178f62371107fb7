"""The ``trustchain`` command.

Exit status: 0 success; 1 the server refused (its error code is printed);
2 bad usage or configuration; 3 the server could not be reached.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

import stoq
from protocol import TrustChainError
from store import AuditError, CertStoreError, KeyStoreError, credential_paths

from . import __version__, _cli_ca
from . import _config as config
from ._app import Node
from ._compose import EVERY_PART, PART_SETS, NodeParts
from ._logging import configure as configure_logging

DEFAULT_SERVER = "[::1]:8443"


def parse_endpoint(text: str, *, default_host: str = "::1") -> tuple[str, int]:
    """``[ADDR]:PORT`` (or a bare ``PORT``) as ``(addr, port)``.

    :raises ValueError: with a message for the user.
    """
    text = text.strip()
    if text.isdigit():
        host, port_text = default_host, text
    elif text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise ValueError(f"{text!r}: expected [ADDR]:PORT, for example [::1]:8443")
        host, port_text = text[1:end], text[end + 2:]
    else:
        raise ValueError(f"{text!r}: expected [ADDR]:PORT, for example [::1]:8443 "
                         "(IPv6 addresses go in brackets)")
    config.check_ipv6(host, "address")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: {port_text!r} is not a port number")
    return host, int(port_text)


def _add_trust_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=DEFAULT_SERVER, metavar="[ADDR]:PORT",
                   help=f"server to ask (default {DEFAULT_SERVER})")
    trust = p.add_mutually_exclusive_group()
    trust.add_argument("--cafile", help="verify the server against this CA certificate file")
    trust.add_argument("--pin", metavar="SHA256",
                       help="accept only the server certificate with this SHA-256 (hex)")
    trust.add_argument("--insecure", action="store_true",
                       help="do not authenticate the server (development only)")
    p.add_argument("--data-dir", default=None,
                   help="local node data directory used to find a default trust anchor "
                        "(default ./trustchain-data)")
    p.add_argument("--engine", choices=stoq.ENGINES, default=stoq.DEFAULT_ENGINE,
                   help="QUIC engine of the client")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trustchain", description=(
        "TrustChain: a QUIC-native, IPv6-only certificate authority, CT log and DNS server."))
    parser.add_argument("--version", action="version", version=f"trustchain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a node (embedded development defaults)")
    serve.add_argument("--config", help="TOML configuration file (default: embedded "
                                        "config/development.toml)")
    serve.add_argument("--listen", action="append", metavar="[ADDR]:PORT",
                       help="listen here instead of the configured addresses (repeatable)")
    serve.add_argument("--data-dir", help="data directory (overrides node.data_dir)")

    for name, text in (("health", "ask a node whether it is healthy"),
                       ("info", "show a node's version, engine, ALPNs, ops and limits"),
                       ("rotation-status", "show the CA's rotation schedule")):
        _add_trust_options(sub.add_parser(name, help=text))

    init = sub.add_parser("init", help="create the CA (root, intermediate, admin) if missing")
    init.add_argument("--config", help="TOML configuration file")
    init.add_argument("--data-dir", help="data directory (overrides node.data_dir)")

    issue = sub.add_parser("issue", help="get a certificate for NAME... from a node")
    issue.add_argument("names", nargs="*", metavar="NAME", help="DNS names")
    issue.add_argument("--ipv6", action="append", metavar="ADDR", help="IPv6 address (repeat)")
    issue.add_argument("--key", required=True, help="private key file (created if missing)")
    issue.add_argument("--key-type", choices=("p256", "p384", "ed25519"), default="p256",
                       help="type of a new key (default p256)")
    issue.add_argument("--out", required=True, help="directory for cert.pem and chain.pem")
    _add_trust_options(issue)

    validate = sub.add_parser("validate", help="status of a certificate by serial")
    validate.add_argument("serial")
    _add_trust_options(validate)

    revoke = sub.add_parser("revoke", help="revoke a certificate")
    revoke.add_argument("serial")
    who = revoke.add_mutually_exclusive_group(required=True)
    who.add_argument("--key", help="the certificate's own private key")
    who.add_argument("--admin", metavar="DIR", help="administrator credential directory "
                                                    "(DATA/admin from `trustchain init`)")
    revoke.add_argument("--reason", default="unspecified",
                        choices=("unspecified", "key_compromise", "affiliation_changed",
                                 "superseded", "cessation_of_operation",
                                 "privilege_withdrawn"))
    _add_trust_options(revoke)

    verify = sub.add_parser("verify", help="check a certificate offline against the root")
    verify.add_argument("certificate", help="PEM certificate (cert.pem)")
    verify.add_argument("--cafile", help="root certificate (default DATA/root.pem)")
    verify.add_argument("--chain", help="intermediates (default chain.pem beside the cert)")
    verify.add_argument("--data-dir", default=None)
    verify.add_argument("--log-key", action="append", metavar="PEM",
                        help="CT log public key (default DATA/ct/*/log-key.pem; repeatable)")

    audit = sub.add_parser("audit", help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_verify = audit_sub.add_parser("verify", help="detect edited, removed or reordered "
                                                       "records")
    audit_verify.add_argument("--config")
    audit_verify.add_argument("--data-dir")
    from . import _cli_cluster, _cli_ct, _cli_dns, _cli_proofs  # (cycle: see the CLI split)
    for module in (_cli_ct, _cli_proofs, _cli_dns, _cli_cluster):
        COMMANDS.update(module.add_commands(sub, add_trust_options=_add_trust_options,
                                            run_client=_run_client))
    return parser


def _trust(args: argparse.Namespace) -> dict[str, Any]:
    """Connection trust options; without any, trust the local node's own files."""
    if args.cafile:
        return {"cafile": args.cafile}
    if args.pin:
        return {"pin": args.pin}
    if args.insecure:
        print("warning: --insecure: the server is not authenticated", file=sys.stderr)
        return {"insecure": True}
    data_dir = Path(args.data_dir or "./trustchain-data")
    root = data_dir / "root.pem"
    if root.is_file():
        return {"cafile": str(root)}
    certfile = credential_paths(data_dir).certfile
    if certfile.is_file():
        return {"pin": stoq.certificate_fingerprint(str(certfile))}
    raise ValueError("no trust anchor: pass --cafile FILE, --pin SHA256 or --insecure "
                     f"(looked for {root} and {certfile})")


def _print_json(value: Any) -> None:
    def default(obj: Any) -> Any:
        if isinstance(obj, bytes):
            return obj.hex()
        return str(obj)
    print(json.dumps(value, indent=2, sort_keys=True, default=default))


async def _client_call(args: argparse.Namespace,
                       body: Callable[[stoq.AsyncClient], Awaitable[int]]) -> int:
    host, port = parse_endpoint(args.server)
    client = await stoq.connect(host, port, engine=args.engine, timeout=args.timeout,
                                keep_alive_interval=None, **_trust(args))
    async with client:
        return await body(client)


def _run_client(args: argparse.Namespace,
                body: Callable[[stoq.AsyncClient], Awaitable[int]]) -> int:
    try:
        return uvloop.run(_client_call(args, body))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except stoq.ConnectionFailed as exc:
        print(f"error: cannot reach {args.server}: {exc.message}", file=sys.stderr)
        return 3
    except TrustChainError as exc:
        print(f"error: {exc.code.value}: {exc.message}", file=sys.stderr)
        return 1


def cmd_serve(args: argparse.Namespace, parts: NodeParts = EVERY_PART) -> int:
    try:
        cfg = config.load(args.config)
        listen = [parse_endpoint(x) for x in args.listen] if args.listen else None
    except (config.ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        configure_logging(cfg.logging)
    except OSError as exc:
        print(f"error: logging.output.path: cannot open the log file: {exc}", file=sys.stderr)
        return 2
    log = logging.getLogger("trustchain")
    for warning in cfg.warnings:
        log.warning(warning)
    node = Node(cfg, data_dir=args.data_dir, listen=listen, parts=parts)
    try:
        uvloop.run(node.run())
    except config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot listen: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_simple(op: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        async def body(client: stoq.AsyncClient) -> int:
            _print_json(await client.request(op))
            return 0
        return _run_client(args, body)
    return command


def client_command(make: Callable[[argparse.Namespace], Callable[[stoq.AsyncClient],
                                                                   Awaitable[int]]]
                   ) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        try:
            body = make(args)
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return _run_client(args, body)
    return command


def offline_command(run: Callable[[argparse.Namespace], int]
                    ) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (config.ConfigError, ValueError, OSError, AuditError, CertStoreError,
                KeyStoreError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return command


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "health": cmd_simple("node.health"),
    "info": cmd_simple("node.info"),
    "rotation-status": client_command(_cli_ca.cmd_rotation_status),
    "init": offline_command(_cli_ca.cmd_init),
    "issue": client_command(_cli_ca.cmd_issue),
    "validate": client_command(_cli_ca.cmd_validate),
    "revoke": client_command(_cli_ca.cmd_revoke),
    "verify": offline_command(_cli_ca.cmd_verify),
    "audit": offline_command(_cli_ca.cmd_audit_verify),
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


def serve_parts(argv: list[str], parts: str) -> int:
    """``trustchain serve ARGV`` with only the services of ``PART_SETS[parts]``: what the
    benchmarks run to measure what each stage adds."""
    args = build_parser().parse_args(["serve", *argv])
    return cmd_serve(args, PART_SETS[parts])


if __name__ == "__main__":
    sys.exit(main())
