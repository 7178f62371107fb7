"""What every ``trustchain`` sub-command module shares: the server and trust options,
running a client command against a node, and printing its answers.

It imports no other ``_cli_*`` module, so each of them can import it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import stoq
from protocol import TrustChainError
from store import StoreError, credential_paths

from . import _config as config

DEFAULT_SERVER = "[::1]:8443"

ClientBody = Callable[[stoq.AsyncClient], Awaitable[int]]
"""What a client command does once it is connected; returns the exit status."""
Command = Callable[[argparse.Namespace], int]
"""A parsed command line to its exit status."""
Subcommands: TypeAlias = "argparse._SubParsersAction[CommandLineParser]"
"""Where a module adds its sub-commands (``parser.add_subparsers()``)."""


class CommandLineParser(argparse.ArgumentParser):
    """``argparse``, with a usage error on one line: what is wrong and where to read more
    (argparse prints the whole usage first, which buries the error)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


def add_trust_options(p: argparse.ArgumentParser) -> None:
    """``--server`` and how to authenticate it, for every command that asks a node."""
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


def trust_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """``stoq.connect`` keywords from the trust options; without any, trust the local
    node's own files."""
    if args.cafile:
        return {"cafile": readable_certificates(args.cafile)}
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


def read_certificates(path: str | Path) -> list[x509.Certificate]:
    """The PEM certificates in ``path``.

    :raises ValueError: it holds none (the message names the file).
    :raises OSError: it cannot be read.
    """
    try:
        return x509.load_pem_x509_certificates(Path(path).read_bytes())
    except ValueError:
        raise ValueError(f"{path}: not a PEM certificate file") from None


def read_private_key(path: str | Path) -> Any:
    """The unencrypted PEM private key in ``path``.

    :raises ValueError: it holds none (the message names the file).
    :raises OSError: it cannot be read.
    """
    try:
        return serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError):  # TypeError: the key is encrypted
        raise ValueError(f"{path}: not an unencrypted PEM private key") from None


def readable_certificates(path: str) -> str:
    """``path`` if it holds PEM certificates, so that a wrong ``--cafile`` is said to be
    wrong rather than shown as a failed handshake.

    :raises ValueError: it cannot be read or holds no certificate.
    """
    try:
        read_certificates(path)
    except OSError as exc:
        raise ValueError(f"--cafile {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"--cafile {exc}") from None
    return path


def print_json(value: Any) -> None:
    """An answer as indented JSON; bytes as hex, anything else JSON lacks as text."""
    def default(obj: Any) -> Any:
        if isinstance(obj, bytes):
            return obj.hex()
        return str(obj)
    print(json.dumps(value, indent=2, sort_keys=True, default=default))


def print_rows(rows: Sequence[Sequence[str]]) -> None:
    """A table with left-aligned columns; the first row is the heading."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


async def client_call(args: argparse.Namespace, body: ClientBody) -> int:
    """Connect to ``--server`` as the trust options say and run ``body``."""
    host, port = parse_endpoint(args.server)
    client = await stoq.connect(host, port, engine=args.engine, timeout=args.timeout,
                                keep_alive_interval=None, **trust_arguments(args))
    async with client:
        return await body(client)


def run_client(args: argparse.Namespace, body: ClientBody) -> int:
    """:func:`client_call` with the failures as exit statuses: 2 bad usage, 3 the server
    could not be reached, 1 it refused (its error code is printed)."""
    try:
        return uvloop.run(client_call(args, body))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except stoq.ConnectionFailed as exc:
        print(f"error: cannot reach {args.server}: {exc.message}", file=sys.stderr)
        return 3
    except TrustChainError as exc:
        print(f"error: {exc.code.value}: {exc.message}", file=sys.stderr)
        return 1


def client_command(make: Callable[[argparse.Namespace], ClientBody]) -> Command:
    """A command that asks a node: ``make`` checks the arguments (ValueError, OSError:
    exit status 2) and says what to do once connected."""
    def command(args: argparse.Namespace) -> int:
        try:
            body = make(args)
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return run_client(args, body)
    return command


def offline_command(run: Command) -> Command:
    """A command on local files: configuration and store failures are exit status 2."""
    def command(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (config.ConfigError, ValueError, OSError, StoreError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return command


class _DropClientNoise(logging.Filter):
    """Drop asyncio's per-packet complaint about sends to a port nobody listens on yet."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "socket.send() raised exception."


def quiet_client_noise(loop: asyncio.AbstractEventLoop) -> None:
    """Keep the output of polling clients readable: a node that is not up yet (or still
    serves its bootstrap certificate) fails handshakes, which is expected here."""
    logging.getLogger("asyncio").addFilter(_DropClientNoise())

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), stoq.ConnectionFailed):
            return  # a failed handshake nobody waits for any more
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
