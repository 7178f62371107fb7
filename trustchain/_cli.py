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
from store import credential_paths

from . import __version__
from . import _config as config
from ._app import Node
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
                       ("info", "show a node's version, engine, ALPNs, ops and limits")):
        _add_trust_options(sub.add_parser(name, help=text))
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


def cmd_serve(args: argparse.Namespace) -> int:
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
    node = Node(cfg, data_dir=args.data_dir, listen=listen)
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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "health": cmd_simple("node.health"),
    "info": cmd_simple("node.info"),
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
