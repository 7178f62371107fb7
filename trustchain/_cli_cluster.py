"""``trustchain cluster ...``: a development validator cluster on this machine.

::

    trustchain cluster init --validators 4 --out DIR   # configs, keys, one shared root
    trustchain cluster up DIR                          # run every node in the foreground
    trustchain cluster status DIR [--json]             # consensus.status of every node

``init`` writes ``DIR/node-I/config.toml`` for I = 1..N (development mode,
software keys, one UDP port per node on ``::1`` for every ALPN), creates each
node's Ed25519 validator key in the node's own keystore and lists all N
validators in every configuration. The cluster has ONE root: it is made once,
then its certificate and (a development simplification, so that every node
can rotate its own issuing intermediate) its private key are copied into every
node, and each node makes its own intermediate under it. ``DIR/root.pem`` is
the trust anchor of the cluster; ``DIR/cluster.toml`` lists the nodes.

``up`` starts ``python -m trustchain serve --config DIR/node-I/config.toml``
for every node (output in ``DIR/node-I/node.log``), waits until each answers
``node.health``, and stays in the foreground: SIGINT and SIGTERM are passed on
to every node (a second one kills them), and a node that exits by itself stops
the others. Exit status 0 after a requested stop, 1 when a node failed.

``status`` asks every node for ``consensus.status``; exit status 3 when no
node could be reached, 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import stoq
from handlers.ca import ROOT_KEY, Hierarchy, HierarchyConfig
from handlers.consensus.bft import validator_id
from protocol import ErrorCode, TrustChainError
from store import AuthorityRecord, SoftwareKeyStore, write_atomic

from . import _config as config
from ._app import Node, open_ca_stores
from ._cli_common import Command, Subcommands, print_rows, quiet_client_noise

DEFAULT_BASE_PORT = 7700
"""Node I listens on ``base + I`` (7701, 7702, ...) unless ``--base-port`` says otherwise."""
DEFAULT_CHAIN_ID = "trustchain-dev-cluster"
CLUSTER_FILE = "cluster.toml"
ROOT_FILE = "root.pem"
ADDRESS = "::1"
LOG_TAIL_LINES = 20
_NODE_DIR = re.compile(r"node-\d+")

DEVELOPMENT_NOTICE = (
    "DEVELOPMENT CLUSTER: keys are software keys on disk, and the cluster root's private key "
    "is copied into every node's keystore (so that each node can rotate its own issuing "
    "intermediate). Anyone who can read one node's data directory can sign as the root. "
    "Never use this for a real CA.")


def add_commands(sub: Subcommands) -> dict[str, Command]:
    parser = sub.add_parser("cluster", help="a development validator cluster on this machine")
    commands = parser.add_subparsers(dest="cluster_command", required=True)

    init = commands.add_parser(
        "init", help="write N node configurations with validator keys and one shared root")
    init.add_argument("--validators", type=int, required=True, metavar="N",
                      help="number of validators (nodes); 4 or more tolerate a byzantine one")
    init.add_argument("--out", required=True, metavar="DIR",
                      help="directory for node-1 ... node-N, root.pem and cluster.toml")
    init.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT, metavar="P",
                      help=f"node I listens on UDP port P+I of [::1] (default {DEFAULT_BASE_PORT});"
                           " 0: pick free ports now")
    init.add_argument("--chain-id", default=DEFAULT_CHAIN_ID, metavar="ID",
                      help=f"name of the cluster, signed into every vote (default "
                           f"{DEFAULT_CHAIN_ID})")
    init.add_argument("--domain", action="append", default=None, metavar="D",
                      help="a TrustChain domain (repeatable; default: the built-in list); "
                           "node I is named node-I.<first domain>")
    init.add_argument("--force", action="store_true",
                      help="replace a cluster already in DIR (deletes its nodes' data and keys)")

    up = commands.add_parser("up", help="run every node of a cluster in the foreground")
    up.add_argument("dir", metavar="DIR", help="directory written by `cluster init`")
    up.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                    help="how long the nodes may take to answer node.health (default 60)")
    up.add_argument("--stop-timeout", type=float, default=30.0, metavar="SECONDS",
                    help="how long stopping nodes may take before they are killed (default 30)")
    up.add_argument("--engine", choices=stoq.ENGINES, default=stoq.DEFAULT_ENGINE,
                    help="QUIC engine of the health checks")

    status = commands.add_parser("status", help="ask every node of a cluster for "
                                                "consensus.status")
    status.add_argument("dir", metavar="DIR", help="directory written by `cluster init`")
    status.add_argument("--json", action="store_true", help="print the answers as JSON")
    status.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="seconds to wait for each node (default 5)")
    status.add_argument("--engine", choices=stoq.ENGINES, default=stoq.DEFAULT_ENGINE,
                        help="QUIC engine of the client")

    def command(args: argparse.Namespace) -> int:
        run = {"init": cmd_init, "up": cmd_up, "status": cmd_status}[args.cluster_command]
        try:
            return run(args)
        except (config.ConfigError, ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return {"cluster": command}


# --- the cluster file -----------------------------------------------------------------


@dataclass
class Member:
    """One node of a cluster, as ``cluster.toml`` lists it."""

    name: str
    config: Path
    address: str
    port: int
    validator_id: str
    public_key: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    exit_reported: bool = False

    @property
    def directory(self) -> Path:
        return self.config.parent

    @property
    def log(self) -> Path:
        return self.directory / "node.log"

    @property
    def endpoint(self) -> str:
        return f"[{self.address}]:{self.port}"


@dataclass
class Cluster:
    directory: Path
    chain_id: str
    root: Path
    members: list[Member]


def load_cluster(directory: Path) -> Cluster:
    """The cluster ``DIR/cluster.toml`` describes.

    :raises ValueError: missing or malformed (the message says what is wrong).
    """
    path = directory / CLUSTER_FILE
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist: run `trustchain cluster init --out "
                         f"{directory}` first") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    members: list[Member] = []
    try:
        for i, node in enumerate(table["nodes"]):
            where = f"{path}: nodes[{i}]"
            if not isinstance(node, dict):
                raise ValueError(f"{where}: expected a table")
            port = node["port"]
            if type(port) is not int or not 0 < port <= 65535:
                raise ValueError(f"{where}.port: {port!r} is not a UDP port")
            address = str(node["address"])
            config.check_ipv6(address, f"{where}.address")
            members.append(Member(name=str(node["name"]),
                                  config=directory / str(node["config"]),
                                  address=address, port=port,
                                  validator_id=str(node.get("validator_id", "")),
                                  public_key=str(node.get("public_key", ""))))
        chain_id = str(table["chain_id"])
        root = directory / str(table.get("root", ROOT_FILE))
    except KeyError as exc:
        raise ValueError(f"{path}: missing key {exc}") from None
    except TypeError as exc:
        raise ValueError(f"{path}: {exc}") from None
    except config.ConfigError as exc:
        raise ValueError(str(exc)) from None
    if not members:
        raise ValueError(f"{path}: lists no nodes")
    return Cluster(directory=directory, chain_id=chain_id, root=root, members=members)


# --- init -------------------------------------------------------------------------


def _toml(value: Any) -> str:
    """``value`` (str, int, or a list of str) as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    # JSON string escapes are valid TOML basic-string escapes (no \u surrogates when
    # ensure_ascii is off; control characters come out as \u00XX); TOML also bars DEL.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def _table(name: str, values: dict[str, Any], *, array: bool = False) -> str:
    head = f"[[{name}]]" if array else f"[{name}]"
    return "\n".join([head, *(f"{k} = {_toml(v)}" for k, v in values.items())]) + "\n"


@dataclass
class _Plan:
    index: int
    name: str
    port: int
    directory: Path

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def config_path(self) -> Path:
        return self.directory / "config.toml"


def node_config_text(plan: _Plan, *, total: int, chain_id: str, domains: list[str],
                     validators: list[dict[str, Any]]) -> str:
    """The TOML configuration of one cluster node."""
    port = plan.port
    parts = [
        f"# TrustChain cluster node {plan.name} of {total}, chain {chain_id!r}.\n"
        "# Written by `trustchain cluster init`: development mode, software keys on disk,\n"
        f"# one UDP port ([{ADDRESS}]:{port}) for every ALPN. See spec/config.md.\n",
        _table("node", {"data_dir": str(plan.data_dir),
                        "names": [f"{plan.name}.{domains[0]}"]}),
        _table("ca", {"ca_id": f"{chain_id}/{plan.name}", "bind_address": ADDRESS,
                      "port": port, "mode": "development"}),
        _table("ca.hsm", {"provider": "software"}),
        _table("ct", {"log_id": f"{chain_id}-ct-{plan.name}", "bind_address": ADDRESS,
                      "port": port}),
        _table("dns", {"server_id": f"{chain_id}-dns-{plan.name}", "bind_address": ADDRESS,
                       "quic_port": port}),
        _table("dns.domains", {"trustchain_domains": domains}),
        _table("consensus", {"chain_id": chain_id, "validator_key": "validator",
                             "minimum_work_difficulty": 16}),
        *(_table("consensus.validators", v, array=True) for v in validators),
        _table("api", {"server_id": f"{chain_id}-api-{plan.name}", "bind_address": ADDRESS,
                       "port": port}),
        _table("logging", {"level": "info", "format": "text"}),
        _table("logging.output", {"type": "stderr"}),
    ]
    return "\n".join(parts)


def free_udp_ports(count: int, address: str = ADDRESS) -> list[int]:
    """``count`` distinct UDP ports of ``address`` that are free right now."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.bind((address, 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_in_use(port: int, address: str = ADDRESS) -> bool:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return True
    return False


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    """Silence the stores' per-open development warnings (one notice is printed instead)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _existing(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and _NODE_DIR.fullmatch(p.name)]
    found += [p for p in (out / CLUSTER_FILE, out / ROOT_FILE, out / ".root") if p.exists()]
    return sorted(found)


def _make_root(cfg: config.Config, workdir: Path, chain_id: str) -> tuple[bytes, AuthorityRecord]:
    """A new root (key PEM, authority record), made with the CA's own Hierarchy code.

    It is made in a scratch data directory that is deleted afterwards: the
    intermediate ``Hierarchy.ensure`` makes there too is discarded, key and all;
    every node makes its own.
    """
    keystore, certs, audit = open_ca_stores(cfg, workdir)
    try:
        hierarchy = Hierarchy(
            keystore=keystore, certs=certs, data_dir=workdir,
            config=HierarchyConfig(ca_id=chain_id,
                                   domains=tuple(cfg.dns.domains.trustchain_domains),
                                   root_lifetime=cfg.ca.root_lifetime,
                                   intermediate_lifetime=cfg.ca.intermediate_lifetime),
            clock=time.time, audit=audit.append)
        hierarchy.ensure()
        record = certs.active_authority("root")
        signer = keystore.get(ROOT_KEY)
        assert record is not None and signer is not None
        key_pem = signer.private_key().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
    finally:
        audit.close()
        certs.close()
        keystore.close()
    return key_pem, record


@dataclass
class _Made:
    public_key: bytes
    intermediate: bytes


def _make_node(cfg: config.Config, key_pem: bytes, root: AuthorityRecord,
               chain_id: str) -> _Made:
    """Give the node at ``cfg`` the cluster root, its own intermediate and validator key."""
    node = Node(cfg)
    node.open_stores()
    try:
        assert node.audit is not None and node.certs is not None
        keystore = node.keystore
        if not isinstance(keystore, SoftwareKeyStore):
            raise config.ConfigError("cluster init writes software-keystore nodes only")
        # The root key goes where the keystore reads it (DATA/keys/root.pem), before
        # anything asks the keystore for it.
        keystore.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(keystore.directory / f"{ROOT_KEY}.pem", key_pem, mode=0o600)
        node.certs.add_authority(root, make_active=True)
        node.audit.append("ca.root-imported", {
            "fingerprint": hashlib.sha256(root.der).hexdigest(), "chain_id": chain_id,
            "by": "trustchain cluster init", "key_copied": True})
        node.audit.append("ca.init", {"config": cfg.source})
        node.prepare_ca(create=True)  # the root exists: only this node's intermediate is new
        assert node.hierarchy is not None and node.hierarchy.issuer is not None
        validator = node.keystore.get_or_create(cfg.consensus.validator_key, "ed25519")
        raw = validator.public_key().public_bytes(serialization.Encoding.Raw,
                                                  serialization.PublicFormat.Raw)
        return _Made(public_key=raw, intermediate=node.hierarchy.issuer.der)
    finally:
        if node.audit is not None:
            node.audit.close()  # signs its last checkpoint: before the keystore closes
        if node.certs is not None:
            node.certs.close()
        node.keystore.close()


def tolerated_faults(n: int) -> int:
    """Byzantine validators that ``n`` equal validators tolerate (n = 3f + 1)."""
    return (n - 1) // 3


def cmd_init(args: argparse.Namespace) -> int:
    total: int = args.validators
    if total < 1:
        print(f"error: --validators {total}: a cluster needs at least 1 validator",
              file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    existing = _existing(out)
    if existing and not args.force:
        names = ", ".join(p.name for p in existing)
        print(f"error: {out} already holds a cluster ({names}); pass --force to replace it "
              "(deletes those nodes' data and keys)", file=sys.stderr)
        return 2
    if existing and (out / CLUSTER_FILE).is_file():
        with contextlib.suppress(ValueError):
            running = [m.name for m in load_cluster(out).members
                       if _port_in_use(m.port, m.address)]
            if running:
                print(f"error: the ports of {', '.join(running)} in {out} are in use: stop "
                      "that cluster before replacing it", file=sys.stderr)
                return 2
    base: int = args.base_port
    if base == 0:
        ports = free_udp_ports(total)
    elif base < 0 or base + total > 65535:
        print(f"error: --base-port {base}: ports {base + 1}..{base + total} are not all UDP "
              "ports", file=sys.stderr)
        return 2
    else:
        ports = [base + i for i in range(1, total + 1)]
    domains: list[str] = args.domain or list(config.DnsDomainsConfig().trustchain_domains)
    chain_id: str = args.chain_id
    plans = [_Plan(index=i, name=f"node-{i}", port=ports[i - 1], directory=out / f"node-{i}")
             for i in range(1, total + 1)]
    # Check the arguments the configurations are made of before anything is written.
    first = config.loads(node_config_text(plans[0], total=total, chain_id=chain_id,
                                          domains=domains, validators=[]), "cluster init")

    if tolerated_faults(total) == 0:
        print(f"warning: {total} validator{'s' if total > 1 else ''} tolerate no byzantine "
              "validator (Tendermint needs n = 3f + 1: at least 4 for f = 1)"
              + ("; every validator must be up for the cluster to make progress"
                 if total > 1 else ""), file=sys.stderr)
    busy = [p for p in ports if base and _port_in_use(p)]
    if busy:
        print(f"warning: UDP port{'s' if len(busy) > 1 else ''} "
              f"{', '.join(map(str, busy))} of [{ADDRESS}] in use right now", file=sys.stderr)

    for path in existing:  # --force
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)

    made: list[_Made] = []
    with _quiet_warnings():
        scratch = out / ".root"
        try:
            key_pem, root = _make_root(first, scratch, chain_id)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        for plan in plans:
            plan.directory.mkdir(parents=True, exist_ok=True)
            cfg = config.loads(node_config_text(plan, total=total, chain_id=chain_id,
                                                domains=domains, validators=[]),
                               str(plan.config_path))
            made.append(_make_node(cfg, key_pem, root, chain_id))

    validators = [{"public_key": m.public_key.hex(), "address": ADDRESS, "port": plan.port,
                   "power": 1, "name": plan.name} for plan, m in zip(plans, made, strict=True)]
    for plan in plans:
        text = node_config_text(plan, total=total, chain_id=chain_id, domains=domains,
                                validators=validators)
        write_atomic(plan.config_path, text.encode())
        config.load(plan.config_path)  # what `serve` will read must load

    root_cert = x509.load_der_x509_certificate(root.der)
    write_atomic(out / ROOT_FILE, root_cert.public_bytes(serialization.Encoding.PEM))
    fingerprint = hashlib.sha256(root.der).hexdigest()
    cluster_text = "\n".join([
        "# A TrustChain development cluster, written by `trustchain cluster init`;\n"
        "# read by `trustchain cluster up` and `trustchain cluster status`.\n"
        "# Node config paths are relative to this directory.\n"
        f"chain_id = {_toml(chain_id)}\n"
        f"root = {_toml(ROOT_FILE)}\n"
        f"root_sha256 = {_toml(fingerprint)}\n"
        f"created = {_toml(datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'))}\n",
        *(_table("nodes", {"name": plan.name,
                           "config": str(plan.config_path.relative_to(out)),
                           "data_dir": str(plan.data_dir), "address": ADDRESS,
                           "port": plan.port, "validator_id": validator_id(m.public_key),
                           "public_key": m.public_key.hex()}, array=True)
          for plan, m in zip(plans, made, strict=True)),
    ])
    write_atomic(out / CLUSTER_FILE, cluster_text.encode())

    faults = tolerated_faults(total)
    print(f"cluster {chain_id!r}: {total} validator{'s' if total > 1 else ''} in {out} "
          f"(tolerates {faults} byzantine validator{'' if faults == 1 else 's'})")
    print(f"root certificate {out / ROOT_FILE} sha256 {fingerprint}")
    rows = [("NAME", "ENDPOINT", "VALIDATOR ID", "CONFIG")]
    rows += [(plan.name, f"[{ADDRESS}]:{plan.port}", validator_id(m.public_key),
              str(plan.config_path)) for plan, m in zip(plans, made, strict=True)]
    print_rows(rows)
    print(DEVELOPMENT_NOTICE)
    print(f"start every node:  trustchain cluster up {out}")
    print(f"start one node:    trustchain serve --config {plans[0].config_path}")
    print(f"consensus status:  trustchain cluster status {out}")
    print(f"ask one node:      trustchain health --server [{ADDRESS}]:{plans[0].port} "
          f"--cafile {out / ROOT_FILE}")
    return 0


# --- up ---------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _child_setup() -> Callable[[], None] | None:
    """On Linux: a ``preexec_fn`` that has the kernel SIGTERM the node if we die."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # we died before prctl took effect
            os._exit(1)

    return setup


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def _package_path() -> str:
    """PYTHONPATH for the nodes: this trustchain first, so they run the same code as we do."""
    here = str(Path(__file__).resolve().parents[1])
    current = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join([here, current]) if current else here


class Supervisor:
    """The node processes of one cluster, run in the foreground."""

    def __init__(self, cluster: Cluster, *, wait: float, stop_timeout: float,
                 engine: str) -> None:
        self.cluster = cluster
        self.wait = wait
        self.stop_timeout = stop_timeout
        self.engine = engine
        self.stopping = False
        self.stop_reason = ""
        self.failed = False
        self.stop_started = 0.0
        self.killed = False
        self.startup_failed = ""
        """The first node that exited before it answered: the others are not waited for."""
        self._wake = asyncio.Event()

    @property
    def members(self) -> list[Member]:
        return self.cluster.members

    def running(self) -> list[Member]:
        return [m for m in self.members if m.proc is not None and m.proc.poll() is None]

    # --- signals and stopping -------------------------------------------------

    def on_signal(self, sig: signal.Signals) -> None:
        if self.stopping:
            if not self.killed:
                print(f"{sig.name} again: killing the nodes", file=sys.stderr, flush=True)
                self.failed = True  # not a clean stop
                self.kill_all()
            return
        print(f"{sig.name}: stopping {len(self.running())} node(s)", file=sys.stderr,
              flush=True)
        self.begin_stop(sig.name, sig)

    def begin_stop(self, reason: str, sig: int = signal.SIGTERM) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.stop_reason = reason
        self.stop_started = time.monotonic()
        for member in self.running():
            assert member.proc is not None
            with contextlib.suppress(ProcessLookupError):
                member.proc.send_signal(sig)
        self._wake.set()

    def kill_all(self) -> None:
        self.killed = True
        for member in self.running():
            assert member.proc is not None
            with contextlib.suppress(ProcessLookupError):
                member.proc.kill()

    # --- starting -------------------------------------------------------------

    def start(self, member: Member, preexec: Callable[[], None] | None) -> None:
        command = [sys.executable, "-m", "trustchain", "serve", "--config",
                   str(member.config)]
        with member.log.open("ab") as log:
            stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            log.write(f"--- {stamp} trustchain cluster up: {' '.join(command)}\n".encode())
            log.flush()
            member.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=member.directory, start_new_session=True, preexec_fn=preexec,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": _package_path()})

    async def health(self, member: Member, deadline: float) -> dict[str, Any] | str:
        """``node.health``'s answer once the node gives one, or why it did not."""
        loop = asyncio.get_running_loop()
        last = "no answer yet"
        while not self.stopping:
            assert member.proc is not None
            code = member.proc.poll()
            if code is not None:
                self.startup_failed = self.startup_failed or member.name
                return f"exited during start-up ({_describe_exit(code)})"
            if self.startup_failed:
                return f"not waited for: {self.startup_failed} failed to start"
            remaining = deadline - loop.time()
            if remaining <= 0:
                return f"no node.health answer within {self.wait:g} s (last: {last})"
            try:
                client = await stoq.connect(member.address, member.port,
                                            cafile=str(self.cluster.root), engine=self.engine,
                                            timeout=min(2.0, remaining),
                                            keep_alive_interval=None)
                async with client:
                    return await client.request("node.health", timeout=min(2.0, remaining))
            except TrustChainError as exc:
                last = exc.message
                if "certificate" in last:
                    last += (" (a cluster node serves a bootstrap certificate until a quorum "
                             "of validators is up and its CA has issued the real one)")
            except OSError as exc:
                last = str(exc)
            await asyncio.sleep(0.2)
        return "stopped before it answered"

    # --- the foreground loop --------------------------------------------------

    def report_exits(self) -> None:
        """Say which nodes exited since the last call; a node that exits by itself fails
        the cluster and stops the others."""
        for member in self.members:
            if member.proc is None or member.exit_reported:
                continue
            code = member.proc.poll()
            if code is None:
                continue
            member.exit_reported = True
            if self.stopping:
                print(f"{member.name} (pid {member.proc.pid}) stopped: {_describe_exit(code)}",
                      flush=True)
                if code != 0 and not self.killed:
                    self.failed = True
                continue
            self.failed = True
            print(f"error: {member.name} (pid {member.proc.pid}) exited unexpectedly: "
                  f"{_describe_exit(code)}; last lines of {member.log}:", file=sys.stderr)
            for line in _log_tail(member.log):
                print(f"  | {line}", file=sys.stderr)
            sys.stderr.flush()
            others = len(self.running())
            if others:
                print(f"stopping the other {others} node(s)", file=sys.stderr, flush=True)
            self.begin_stop(f"{member.name} exited")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        quiet_client_noise(loop)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.on_signal, sig)
        preexec = _child_setup()
        for member in self.members:
            if self.stopping:
                break
            self.start(member, preexec)
        print(f"started {len(self.running())} node(s) of cluster {self.cluster.chain_id!r}; "
              f"waiting up to {self.wait:g} s for node.health", flush=True)
        deadline = loop.time() + self.wait
        started = [m for m in self.members if m.proc is not None]
        answers = await asyncio.gather(*(self.health(m, deadline) for m in started))
        if not self.stopping:
            rows = [("NAME", "PID", "ENDPOINT", "HEALTH", "LOG")]
            bad = []
            for member, answer in zip(started, answers, strict=True):
                assert member.proc is not None
                health = (str(answer.get("status", "?")) if isinstance(answer, dict)
                          else "-" if answer.startswith("not waited for") else "FAILED")
                rows.append((member.name, str(member.proc.pid), member.endpoint,
                             str(health), str(member.log)))
                if not isinstance(answer, dict):
                    bad.append((member, answer))
            print_rows(rows)
            sys.stdout.flush()
            if bad:
                self.failed = True
                for member, why in bad:
                    if why.startswith("not waited for"):
                        continue
                    print(f"error: {member.name} {why}; last lines of {member.log}:",
                          file=sys.stderr)
                    for line in _log_tail(member.log):
                        print(f"  | {line}", file=sys.stderr)
                for member, _ in bad:  # already reported
                    if member.proc is not None and member.proc.poll() is not None:
                        member.exit_reported = True
                print("stopping the cluster", file=sys.stderr, flush=True)
                self.begin_stop("start-up failed")
            else:
                print(f"all {len(started)} nodes are up (chain {self.cluster.chain_id!r}); "
                      "Ctrl-C or SIGTERM stops them", flush=True)
        while True:
            self.report_exits()
            if not self.running():
                break
            if (self.stopping and not self.killed
                    and time.monotonic() - self.stop_started > self.stop_timeout):
                names = ", ".join(m.name for m in self.running())
                print(f"error: {names} did not stop within {self.stop_timeout:g} s: killing",
                      file=sys.stderr, flush=True)
                self.failed = True
                self.kill_all()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)
        self.report_exits()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        print("all nodes stopped" + (" (with errors)" if self.failed else ""), flush=True)
        return 1 if self.failed else 0


def cmd_up(args: argparse.Namespace) -> int:
    cluster = load_cluster(Path(args.dir).resolve())
    missing = [str(p) for p in [cluster.root, *(m.config for m in cluster.members)]
               if not p.is_file()]
    if missing:
        raise ValueError(f"missing: {', '.join(missing)}")
    supervisor = Supervisor(cluster, wait=args.wait, stop_timeout=args.stop_timeout,
                            engine=args.engine)
    result: int = uvloop.run(supervisor.run())
    return result


# --- status -------------------------------------------------------------------------


async def _ask_status(member: Member, cafile: Path, engine: str,
                      timeout: float) -> dict[str, Any]:
    """One node's ``consensus.status``, or why there is none."""
    answer: dict[str, Any] = {"name": member.name, "endpoint": member.endpoint,
                              "validator_id": member.validator_id, "reachable": False,
                              "error": None, "status": None}
    try:
        client = await stoq.connect(member.address, member.port, cafile=str(cafile),
                                    engine=engine, timeout=timeout, keep_alive_interval=None)
    except (TrustChainError, OSError) as exc:
        answer["error"] = {"code": "unreachable", "message": str(exc)}
        return answer
    answer["reachable"] = True
    try:
        async with client:
            answer["status"] = await client.request("consensus.status", timeout=timeout)
    except stoq.ConnectionFailed as exc:
        answer["reachable"] = False
        answer["error"] = {"code": "unreachable", "message": exc.message}
    except TrustChainError as exc:
        answer["error"] = {"code": exc.code.value, "message": exc.message}
    return answer


async def _ask_all(cluster: Cluster, engine: str, timeout: float) -> list[dict[str, Any]]:
    quiet_client_noise(asyncio.get_running_loop())
    return list(await asyncio.gather(*(_ask_status(m, cluster.root, engine, timeout)
                                       for m in cluster.members)))


def _short(value: Any, size: int = 12) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()[:size]
    return str(value)[:size]


def _status_row(answer: dict[str, Any]) -> tuple[str, ...]:
    name = answer["name"]
    status = answer["status"]
    error = answer["error"]
    if status is None:
        if not answer["reachable"]:
            note = f"cannot reach {answer['endpoint']}: {error['message']}"
        elif error["code"] == ErrorCode.UNKNOWN_OP.value:
            note = "consensus.status unknown: this node runs no consensus service (unknown_op)"
        else:
            note = f"consensus.status failed: {error['code']}: {error['message']}"
        return (name, "yes" if answer["reachable"] else "NO", "-", "-", "-", "-", "-", "-",
                note)
    names = {v.get("id"): v.get("name") or _short(v.get("id"), 8)
             for v in status.get("validators", [])}
    isolated = [names.get(i, _short(i, 8)) for i in status.get("isolated", [])]
    last = status.get("last_block")
    last_text = f"{last['height']}:{_short(last['id'])}" if last else "-"
    connected = [p for p in status.get("peers", []) if p.get("connected")]
    note = f"{len(connected)}/{len(status.get('peers', []))} peers connected"
    return (name, "yes", str(status.get("height", "?")), str(status.get("round", "?")),
            str(status.get("step", "?")), ",".join(isolated) or "-",
            str(len(status.get("evidence", []))), last_text, note)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def cmd_status(args: argparse.Namespace) -> int:
    cluster = load_cluster(Path(args.dir).resolve())
    if not cluster.root.is_file():
        raise ValueError(f"missing the cluster's root certificate {cluster.root}")
    answers: list[dict[str, Any]] = uvloop.run(_ask_all(cluster, args.engine, args.timeout))
    reachable = sum(1 for a in answers if a["reachable"])
    if args.json:
        print(json.dumps({"chain_id": cluster.chain_id, "nodes": _jsonable(answers)},
                         indent=2, sort_keys=True))
    else:
        rows: list[tuple[str, ...]] = [("NAME", "REACHABLE", "HEIGHT", "ROUND", "STEP",
                                        "ISOLATED", "EVIDENCE", "LAST BLOCK", "NOTE")]
        rows += [_status_row(a) for a in answers]
        print_rows(rows)
        chains = {a["status"].get("chain_id") for a in answers if a["status"]}
        for chain in sorted(str(c) for c in chains - {cluster.chain_id}):
            print(f"warning: a node reports chain {chain!r}, not {cluster.chain_id!r}",
                  file=sys.stderr)
        print(f"{reachable} of {len(answers)} nodes reachable")
    return 0 if reachable else 3
