"""The directory of a development validator cluster, as ``cluster init`` makes it.

::

    DIR/cluster.toml         the chain id, the root's fingerprint and every node
    DIR/root.pem             the one root of the cluster: its trust anchor
    DIR/node-I/config.toml   node I: development mode, software keys, [::1]:PORT
    DIR/node-I/data/         its keystore (root key copy, validator key), CA, chain

:func:`make_cluster` writes it; :func:`load_cluster` reads ``cluster.toml``
back for ``cluster up`` and ``cluster status``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import random
import re
import shutil
import socket
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from handlers.ca import ROOT_KEY
from handlers.consensus.bft import validator_id
from store import AuthorityRecord, DataDirectory, SoftwareKeyStore, write_atomic

from . import _config as config
from ._compose import ca_hierarchy, data_directory, open_ca, open_ca_stores

DEFAULT_CHAIN_ID = "trustchain-dev-cluster"
CLUSTER_FILE = "cluster.toml"
ROOT_FILE = "root.pem"
ADDRESS = "::1"
INTERMEDIATE_FILE = "intermediate.pem"
"""With ``--ceremony``: each node's signed intermediate, next to its configuration."""
ROOT_HOLDER = "root-holder"
"""With ``--ceremony``: the root's own data directory (the only place its key lives)."""
_NODE_DIR = re.compile(r"node-\d+")


# --- reading cluster.toml -----------------------------------------------------------


@dataclass
class Member:
    """One node of a cluster, as ``cluster.toml`` lists it."""

    name: str
    config: Path
    address: str
    port: int
    validator_id: str
    public_key: str = ""

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


# --- what is there, and which ports are free -------------------------------------------


def existing_cluster_files(directory: Path) -> list[Path]:
    """What a cluster in ``directory`` consists of (node directories, cluster.toml,
    root.pem, an unfinished root), for ``--force`` to remove."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _NODE_DIR.fullmatch(p.name)]
    found += [p for p in (directory / CLUSTER_FILE, directory / ROOT_FILE,
                          directory / ".root", directory / ROOT_HOLDER) if p.exists()]
    return sorted(found)


def remove_cluster_files(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def running_nodes(directory: Path) -> list[str]:
    """The nodes of the cluster in ``directory`` whose port is in use (empty when there
    is no readable cluster.toml)."""
    if not (directory / CLUSTER_FILE).is_file():
        return []
    try:
        members = load_cluster(directory).members
    except ValueError:
        return []
    return [m.name for m in members if port_in_use(m.port, m.address)]


EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
FIXED_PORTS_FROM = 20000
"""The lowest port picked for a node (below the system's ephemeral range)."""


def _ephemeral_start() -> int:
    """The first port the kernel hands to sockets bound to port 0 (32768 if unknown)."""
    try:
        return int(Path(EPHEMERAL_RANGE_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_udp_ports(count: int, address: str = ADDRESS) -> list[int]:
    """``count`` distinct UDP ports of ``address`` that are free right now, below the
    kernel's ephemeral range: a node keeps its port across restarts, and a port the
    kernel hands out to any client socket meanwhile (a status poll, a peer link) would
    keep a restarted node from binding it."""
    high = _ephemeral_start()
    low = FIXED_PORTS_FROM if high - FIXED_PORTS_FROM > 10 * count else 1024
    candidates = random.sample(range(low, high), min(high - low, 50 * count + 100))
    ports: list[int] = []
    for port in candidates:
        if len(ports) == count:
            break
        if not port_in_use(port, address):
            ports.append(port)
    if len(ports) < count:
        raise OSError(f"no {count} free UDP ports of [{address}] between {low} and {high}")
    return ports


def port_in_use(port: int, address: str = ADDRESS) -> bool:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return True
    return False


# --- the node configurations ------------------------------------------------------------


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


@dataclass(frozen=True)
class NodePlan:
    """Where node ``index`` of a new cluster goes and which port it gets."""

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


@dataclass(frozen=True)
class ClusterPlan:
    """The cluster ``cluster init`` was asked for, before anything is written."""

    directory: Path
    chain_id: str
    domains: list[str]
    nodes: list[NodePlan]

    @classmethod
    def of(cls, directory: Path, ports: list[int], *, chain_id: str,
           domains: list[str]) -> ClusterPlan:
        """Node I (1-based) in ``directory/node-I``, on ``ports[I - 1]``."""
        nodes = [NodePlan(index=i, name=f"node-{i}", port=port,
                          directory=directory / f"node-{i}")
                 for i, port in enumerate(ports, start=1)]
        return cls(directory=directory, chain_id=chain_id, domains=domains, nodes=nodes)

    def config_text(self, node: NodePlan,
                    validators: list[dict[str, Any]] | None = None) -> str:
        return node_config_text(node, total=len(self.nodes), chain_id=self.chain_id,
                                domains=self.domains, validators=validators or [])

    def check(self) -> config.Config:
        """The first node's configuration, parsed: the arguments it is made of are
        checked before anything is written.

        :raises config.ConfigError: an argument makes no valid configuration.
        """
        return config.loads(self.config_text(self.nodes[0]), "cluster init")


def node_config_text(plan: NodePlan, *, total: int, chain_id: str, domains: list[str],
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


# --- making the keys ----------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    """Silence the stores' per-open development warnings (``cluster init`` prints one
    notice instead)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _make_root(cfg: config.Config, workdir: Path, chain_id: str) -> tuple[bytes, AuthorityRecord]:
    """A new root (key PEM, authority record), made with the CA's own Hierarchy code.

    It is made in a scratch data directory that is deleted afterwards: the
    intermediate ``Hierarchy.ensure`` makes there too is discarded, key and all;
    every node makes its own.
    """
    ca_cfg = config.replace(cfg, ca=dataclasses.replace(cfg.ca, ca_id=chain_id))
    data = DataDirectory(workdir)
    with open_ca_stores(ca_cfg, data) as stores:
        open_ca(ca_cfg, data, stores.keystore, stores.authorities, stores.audit, create=True)
        record = stores.authorities.active_authority("root")
        signer = stores.keystore.get(ROOT_KEY)
        assert record is not None and signer is not None
        key_pem = signer.private_key().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
    return key_pem, record


def _make_node(cfg: config.Config, key_pem: bytes, root: AuthorityRecord,
               chain_id: str) -> bytes:
    """Give the node at ``cfg`` the cluster root, its own intermediate and validator key;
    return the validator's raw Ed25519 public key."""
    data = data_directory(cfg, Path(cfg.node.data_dir).resolve())
    with open_ca_stores(cfg, data) as stores:
        keystore = stores.keystore
        if not isinstance(keystore, SoftwareKeyStore):
            raise config.ConfigError("cluster init writes software-keystore nodes only")
        # The root key goes into the keystore before anything asks the keystore for it.
        keystore.import_key(ROOT_KEY, key_pem)
        stores.authorities.add_authority(root, make_active=True)
        stores.audit.append("ca.root-imported", {
            "fingerprint": hashlib.sha256(root.der).hexdigest(), "chain_id": chain_id,
            "by": "trustchain cluster init", "key_copied": True})
        stores.audit.append("ca.init", {"config": cfg.source})
        # the root exists: only this node's intermediate is new
        open_ca(cfg, data, keystore, stores.authorities, stores.audit, create=True)
        validator = keystore.get_or_create(cfg.consensus.validator_key, "ed25519")
        raw: bytes = validator.public_key().public_bytes(serialization.Encoding.Raw,
                                                         serialization.PublicFormat.Raw)
        return raw


def _make_root_holder(cfg: config.Config, directory: Path, chain_id: str) -> AuthorityRecord:
    """The root in its own data directory, kept: its key never leaves it."""
    ca_cfg = config.replace(cfg, ca=dataclasses.replace(cfg.ca, ca_id=chain_id))
    data = DataDirectory(directory)
    with open_ca_stores(ca_cfg, data) as stores:
        open_ca(ca_cfg, data, stores.keystore, stores.authorities, stores.audit, create=True)
        record = stores.authorities.active_authority("root")
        assert record is not None
    return record


def _make_node_by_ceremony(cfg: config.Config, holder_cfg: config.Config, holder: Path,
                           root: AuthorityRecord, name: str) -> bytes:
    """The production ceremony for one node (``trustchain ceremony request``, ``sign``,
    ``install``): its intermediate key is made in its keystore, the root holder signs the
    request; return the validator's raw Ed25519 public key."""
    data = data_directory(cfg, Path(cfg.node.data_dir).resolve())
    holder_data = DataDirectory(holder)
    with open_ca_stores(cfg, data) as stores:
        hierarchy = ca_hierarchy(cfg, data, stores.keystore, stores.authorities, stores.audit)
        _, request = hierarchy.request_intermediate(name)
        with open_ca_stores(holder_cfg, holder_data) as root_stores:
            root_side = ca_hierarchy(holder_cfg, holder_data, root_stores.keystore,
                                     root_stores.authorities, root_stores.audit)
            root_side.ensure()
            signed = root_side.sign_intermediate(request)
        root_pem = x509.load_der_x509_certificate(root.der).public_bytes(
            serialization.Encoding.PEM)
        signed_pem = signed.public_bytes(serialization.Encoding.PEM)
        hierarchy.install_intermediate(signed_pem, root_pem)
        # kept beside the configuration: with the keystore, all a validator needs to
        # rebuild a lost data directory (`trustchain ceremony install`, then the blocks)
        write_atomic(Path(cfg.source).parent / INTERMEDIATE_FILE, signed_pem)
        stores.audit.append("ca.init", {"config": cfg.source})
        hierarchy.ensure()
        hierarchy.ensure_admin()
        validator = stores.keystore.get_or_create(cfg.consensus.validator_key, "ed25519")
        raw: bytes = validator.public_key().public_bytes(serialization.Encoding.Raw,
                                                         serialization.PublicFormat.Raw)
        return raw


# --- writing it ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MadeCluster:
    """What :func:`make_cluster` made: the root and each node's validator key."""

    root_der: bytes
    validator_keys: list[bytes]
    """Raw Ed25519 public keys, in the order of the plan's nodes."""

    @property
    def root_fingerprint(self) -> str:
        return hashlib.sha256(self.root_der).hexdigest()

    def validator_ids(self) -> list[str]:
        return [validator_id(key) for key in self.validator_keys]


def make_cluster(plan: ClusterPlan, *, ceremony: bool = False) -> MadeCluster:
    """Make the root and every node's keys, then write the node configurations (each
    listing every validator), ``root.pem`` and ``cluster.toml``.

    :param ceremony: keep the root key in its own directory (``root-holder``) and give
        each node an intermediate by the production ceremony, instead of copying the
        root key into every node (the development shortcut).
    """
    out = plan.directory
    out.mkdir(parents=True, exist_ok=True)
    keys: list[bytes] = []
    with _quiet_warnings():
        if ceremony:
            holder_cfg = config.replace(plan.check(), ca=dataclasses.replace(
                plan.check().ca, ca_id=plan.chain_id))
            root = _make_root_holder(holder_cfg, out / ROOT_HOLDER, plan.chain_id)
            for node in plan.nodes:
                node.directory.mkdir(parents=True, exist_ok=True)
                cfg = config.loads(plan.config_text(node), str(node.config_path))
                keys.append(_make_node_by_ceremony(cfg, holder_cfg, out / ROOT_HOLDER, root,
                                                   node.name))
        else:
            scratch = out / ".root"
            try:
                key_pem, root = _make_root(plan.check(), scratch, plan.chain_id)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            for node in plan.nodes:
                node.directory.mkdir(parents=True, exist_ok=True)
                cfg = config.loads(plan.config_text(node), str(node.config_path))
                keys.append(_make_node(cfg, key_pem, root, plan.chain_id))
    made = MadeCluster(root_der=root.der, validator_keys=keys)

    validators = [{"public_key": key.hex(), "address": ADDRESS, "port": node.port,
                   "power": 1, "name": node.name, "names": [f"{node.name}.{plan.domains[0]}"]}
                  for node, key in zip(plan.nodes, keys, strict=True)]
    for node in plan.nodes:
        write_atomic(node.config_path, plan.config_text(node, validators).encode())
        config.load(node.config_path)  # what `serve` will read must load

    root_cert = x509.load_der_x509_certificate(root.der)
    write_atomic(out / ROOT_FILE, root_cert.public_bytes(serialization.Encoding.PEM))
    write_atomic(out / CLUSTER_FILE, _cluster_file_text(plan, made).encode())
    return made


def _cluster_file_text(plan: ClusterPlan, made: MadeCluster) -> str:
    out = plan.directory
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return "\n".join([
        "# A TrustChain development cluster, written by `trustchain cluster init`;\n"
        "# read by `trustchain cluster up` and `trustchain cluster status`.\n"
        "# Node config paths are relative to this directory.\n"
        f"chain_id = {_toml(plan.chain_id)}\n"
        f"root = {_toml(ROOT_FILE)}\n"
        f"root_sha256 = {_toml(made.root_fingerprint)}\n"
        f"created = {_toml(created)}\n",
        *(_table("nodes", {"name": node.name,
                           "config": str(node.config_path.relative_to(out)),
                           "data_dir": str(node.data_dir), "address": ADDRESS,
                           "port": node.port, "validator_id": validator_id(key),
                           "public_key": key.hex()}, array=True)
          for node, key in zip(plan.nodes, made.validator_keys, strict=True)),
    ])
