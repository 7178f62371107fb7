"""The ``trustchain`` command.

Exit status: 0 success; 1 the server refused (its error code is printed) or a
check failed; 2 bad usage or configuration; 3 the server could not be reached;
130 interrupted (Ctrl-C). Every error is one line on standard error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

import uvloop

import stoq
from protocol import TrustChainError
from store import StoreError, TileCorrupted

from . import (
    __version__,
    _cli_ca,
    _cli_ceremony,
    _cli_cluster,
    _cli_consensus,
    _cli_ct,
    _cli_demo,
    _cli_dns,
    _cli_proofs,
    _cli_verify,
)
from . import _config as config
from ._app import Node
from ._cli_common import (
    Command,
    CommandLineParser,
    Subcommands,
    add_trust_options,
    client_command,
    offline_command,
    parse_endpoint,
    print_json,
    run_client,
)
from ._collector import freeze_startup, tune_for_serving
from ._logging import configure as configure_logging

ADD_COMMANDS: list[Callable[[Subcommands], dict[str, Command]]] = [
    _cli_demo.add_commands,
    _cli_verify.add_commands,
    _cli_ct.add_commands,
    _cli_proofs.add_commands,
    _cli_dns.add_commands,
    _cli_cluster.add_commands,
    _cli_consensus.add_commands,
    _cli_ceremony.add_commands,
]
"""The ``add_commands`` of each sub-command module, in the order of ``--help``. They run
after the core commands exist: proofs adds ``--proofs-dir`` to ``issue`` and ``revoke``."""


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    """The parser of every command, and the command each sub-command name runs."""
    parser = CommandLineParser(prog="trustchain", description=(
        "TrustChain: a QUIC-native, IPv6-only certificate authority, CT log and DNS server."))
    parser.add_argument("--version", action="version", version=f"trustchain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a node (embedded development defaults)")
    serve.add_argument("--config", help="TOML configuration file (default: embedded "
                                        "config/development.toml)")
    serve.add_argument("--listen", action="append", metavar="[ADDR]:PORT",
                       help="listen here instead of the configured addresses (repeatable)")
    serve.add_argument("--data-dir", help="data directory (overrides node.data_dir)")
    serve.add_argument("--check-audit-log", action="store_true",
                       help="verify the whole audit chain before starting (by default only "
                            "the records from the last signed checkpoint)")

    for name, text in (("health", "ask a node whether it is healthy"),
                       ("info", "show a node's version, engine, ALPNs, ops and limits"),
                       ("rotation-status", "show the CA's rotation schedule")):
        add_trust_options(sub.add_parser(name, help=text))

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
    add_trust_options(issue)

    validate = sub.add_parser("validate", help="status of a certificate by serial")
    validate.add_argument("serial")
    add_trust_options(validate)

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
    add_trust_options(revoke)

    audit = sub.add_parser("audit", help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_verify = audit_sub.add_parser("verify", help="detect edited, removed or reordered "
                                                       "records")
    audit_verify.add_argument("--config")
    audit_verify.add_argument("--data-dir")
    audit_verify.add_argument("--from-s3", action="store_true",
                              help="check the whole chain from the [audit.storage] bucket "
                                   "alone (credentials from the AWS environment), and "
                                   "compare the local log with it")
    commands = dict(CORE_COMMANDS)
    for add_commands in ADD_COMMANDS:
        commands.update(add_commands(sub))
    return parser, commands


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
    tune_for_serving()
    node = Node(cfg, data_dir=args.data_dir, listen=listen,
                check_audit_log=args.check_audit_log)
    try:
        uvloop.run(node.run(ready=lambda _: freeze_startup()))
    except TileCorrupted as exc:
        data_dir = args.data_dir or cfg.node.data_dir
        print(f"error: the CT log is damaged, the node will not start: {exc}. "
              f"`trustchain ct check --data-dir {data_dir}` verifies every tile; "
              f"{_cli_ct.DAMAGED_ADVICE}", file=sys.stderr)
        return 2
    except (config.ConfigError, StoreError) as exc:  # the data directory in use, the keys...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file names itself; a socket that cannot bind does not
        print(f"error: {exc}" if exc.filename else f"error: cannot listen: {exc}",
              file=sys.stderr)
        return 2
    return 0


def cmd_simple(op: str) -> Command:
    """A command that prints the answer of ``op`` (no arguments) as JSON."""
    def command(args: argparse.Namespace) -> int:
        async def body(client: stoq.AsyncClient) -> int:
            print_json(await client.request(op))
            return 0
        return run_client(args, body)
    return command


CORE_COMMANDS: dict[str, Command] = {
    "serve": cmd_serve,
    "health": cmd_simple("node.health"),
    "info": cmd_simple("node.info"),
    "rotation-status": client_command(_cli_ca.cmd_rotation_status),
    "init": offline_command(_cli_ca.cmd_init),
    "issue": client_command(_cli_ca.cmd_issue),
    "validate": client_command(_cli_ca.cmd_validate),
    "revoke": client_command(_cli_ca.cmd_revoke),
    "audit": offline_command(_cli_ca.cmd_audit_verify),
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; every failure a user can cause ends in one ``error:`` line
    and a non-zero status, never a traceback (``TRUSTCHAIN_TRACEBACK=1`` shows one for an
    unexpected error)."""
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    try:
        return commands[args.command](args)
    except BrokenPipeError:
        # the reader went away (`trustchain ct watch | head`): stop quietly, and keep the
        # interpreter's final flush of stdout from failing again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (config.ConfigError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except stoq.ConnectionFailed as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 3
    except TrustChainError as exc:
        print(f"error: {exc.code.value}: {exc.message}", file=sys.stderr)
        return 1
    except Exception as exc:
        if os.environ.get("TRUSTCHAIN_TRACEBACK"):
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (TRUSTCHAIN_TRACEBACK=1 shows "
              "where)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
