"""``trustchain ceremony``: the production path of a validator's issuing intermediate.

Each validator keeps its own intermediate key in its own keystore (token); the
root key stays with the root holder, who never copies it anywhere:

1. the validator: ``trustchain ceremony request --config node.toml --out v.csr``
   makes a new key in its keystore and a certificate request;
2. the root holder (a data directory made by ``trustchain init``, its root key
   in its own token): ``trustchain ceremony sign --config root.toml --csr v.csr
   --out v.pem``;
3. the validator: ``trustchain ceremony install --config node.toml --certificate
   v.pem --root root.pem``; on its next start it announces that intermediate
   to the cluster (a ``keys`` decision every validator checks against the root).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from store import write_atomic

from . import _config as config
from ._cli_common import Command, Subcommands, offline_command
from ._compose import ca_hierarchy, data_directory, open_ca_stores


def add_commands(sub: Subcommands) -> dict[str, Command]:
    parser = sub.add_parser("ceremony", help="production: have the root sign a validator's "
                                             "issuing intermediate (no root key copied)")
    commands = parser.add_subparsers(dest="ceremony_command", required=True)
    request = commands.add_parser("request", help="validator: make an intermediate key in "
                                                  "the keystore and its certificate request")
    request.add_argument("--holder", default=None,
                         help="who holds the key, in the intermediate's name (default: the "
                              "node's first name)")
    request.add_argument("--out", required=True, help="where to write the request (PEM)")
    sign = commands.add_parser("sign", help="root holder: sign a validator's request")
    sign.add_argument("--csr", required=True, help="the validator's request (PEM)")
    sign.add_argument("--out", required=True, help="where to write the intermediate (PEM)")
    install = commands.add_parser("install", help="validator: install the signed "
                                                  "intermediate as its issuer")
    install.add_argument("--certificate", required=True, help="the intermediate (PEM)")
    install.add_argument("--root", required=True, help="the cluster's root certificate (PEM)")
    for each in (request, sign, install):
        each.add_argument("--config", required=True, help="TOML configuration file")
        each.add_argument("--data-dir", help="data directory (overrides node.data_dir)")

    def command(args: argparse.Namespace) -> int:
        cfg = config.load(args.config)
        data = data_directory(cfg, Path(args.data_dir or cfg.node.data_dir).resolve())
        with open_ca_stores(cfg, data) as stores:
            hierarchy = ca_hierarchy(cfg, data, stores.keystore, stores.authorities,
                                     stores.audit)
            if args.ceremony_command == "request":
                holder = args.holder or (cfg.node.names[0] if cfg.node.names else "validator")
                name, csr = hierarchy.request_intermediate(holder)
                write_atomic(Path(args.out), csr)
                print(f"made the key {name!r} in the {stores.keystore.kind} keystore; "
                      f"request in {args.out}: have the root holder run "
                      f"`trustchain ceremony sign --csr {args.out}`")
            elif args.ceremony_command == "sign":
                if stores.authorities.active_authority("root") is None:
                    raise ValueError(f"no root in {data.root}: run `trustchain init` there")
                hierarchy.ensure()
                cert = hierarchy.sign_intermediate(Path(args.csr).read_bytes())
                pem = cert.public_bytes(serialization.Encoding.PEM)
                write_atomic(Path(args.out), pem)
                der = cert.public_bytes(serialization.Encoding.DER)
                print(f"signed {cert.subject.rfc4514_string()} (sha256 "
                      f"{hashlib.sha256(der).hexdigest()}) into {args.out}; the root is "
                      f"{hierarchy.root_file.path}")
            else:
                issuer = hierarchy.install_intermediate(Path(args.certificate).read_bytes(),
                                                        Path(args.root).read_bytes())
                print(f"installed {issuer.name} as the issuing intermediate "
                      f"(sha256 {hashlib.sha256(issuer.der).hexdigest()}); start the node "
                      "to announce it to the cluster")
        return 0

    return {"ceremony": offline_command(command)}
