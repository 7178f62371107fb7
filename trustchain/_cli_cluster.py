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
to every node (a second one kills them). A node that exits by itself is
restarted with a back-off (``_supervisor.RestartPolicy``), or with
``--no-restart`` stops the others. Exit status 0 after a requested stop, 1
when a node failed (or was given up on).

``status`` asks every node for ``consensus.status``; exit status 3 when no
node could be reached, 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import uvloop

import stoq
from protocol import ErrorCode, TrustChainError

from . import _config as config
from ._cli_common import Command, Subcommands, print_rows, quiet_client_noise
from ._cluster_layout import (
    ADDRESS,
    DEFAULT_CHAIN_ID,
    ROOT_FILE,
    ROOT_HOLDER,
    Cluster,
    ClusterPlan,
    MadeCluster,
    Member,
    existing_cluster_files,
    free_udp_ports,
    load_cluster,
    make_cluster,
    port_in_use,
    remove_cluster_files,
    running_nodes,
)
from ._supervisor import RestartPolicy, Supervisor

DEFAULT_BASE_PORT = 7700
"""Node I listens on ``base + I`` (7701, 7702, ...) unless ``--base-port`` says otherwise."""

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
    init.add_argument("--ceremony", action="store_true",
                      help="keep the root key in DIR/root-holder only and give each node an "
                           "intermediate by the production ceremony (`trustchain ceremony`) "
                           "instead of copying the root key into every node")
    init.add_argument("--force", action="store_true",
                      help="replace a cluster already in DIR (deletes its nodes' data and keys)")

    policy = RestartPolicy()
    up = commands.add_parser(
        "up", help="run every node of a cluster in the foreground",
        description=(
            "Run every node of the cluster in the foreground until Ctrl-C or SIGTERM, which "
            "stop every node (a second one kills them); exit status 0 after such a stop. "
            "A node that exits by itself (a crash, kill -9) is reported with the tail of "
            f"its log and restarted after {policy.first_delay:g} s, a delay that doubles with "
            f"each further exit up to {policy.max_delay:g} s and starts again at "
            f"{policy.first_delay:g} s once the node has stayed up {policy.stable_after:g} s. "
            f"A node that exits {policy.max_failed_starts} times in a row before answering "
            "node.health is given up on: the others keep running, and the exit status "
            "becomes 1. A node that fails to come up at the first start stops the cluster "
            "(exit status 1)."))
    up.add_argument("dir", metavar="DIR", help="directory written by `cluster init`")
    up.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                    help="how long the nodes may take to answer node.health, at the start "
                         "and after a restart (default 60)")
    up.add_argument("--stop-timeout", type=float, default=30.0, metavar="SECONDS",
                    help="how long stopping nodes may take before they are killed (default 30)")
    up.add_argument("--engine", choices=stoq.ENGINES, default=stoq.DEFAULT_ENGINE,
                    help="QUIC engine of the health checks")
    up.add_argument("--no-restart", action="store_true",
                    help="do not restart a node that exits: stop the whole cluster instead "
                         "(exit status 1)")

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


# --- init -------------------------------------------------------------------------


def tolerated_faults(n: int) -> int:
    """Byzantine validators that ``n`` equal validators tolerate (n = 3f + 1)."""
    return (n - 1) // 3


def _replaceable(out: Path, *, force: bool) -> list[Path]:
    """The files of a cluster already in ``out``, which ``--force`` may replace.

    :raises ValueError: there is one and no ``--force``, or its nodes are running.
    """
    existing = existing_cluster_files(out)
    if existing and not force:
        names = ", ".join(p.name for p in existing)
        raise ValueError(f"{out} already holds a cluster ({names}); pass --force to replace "
                         "it (deletes those nodes' data and keys)")
    running = running_nodes(out) if existing else []
    if running:
        raise ValueError(f"the ports of {', '.join(running)} in {out} are in use: stop "
                         "that cluster before replacing it")
    return existing


def _node_ports(base: int, total: int) -> list[int]:
    """Node I's port: ``base + I``; free ports picked now when ``base`` is 0.

    :raises ValueError: some of those are not UDP ports.
    """
    if base == 0:
        return free_udp_ports(total)
    if base < 0 or base + total > 65535:
        raise ValueError(f"--base-port {base}: ports {base + 1}..{base + total} are not all "
                         "UDP ports")
    return [base + i for i in range(1, total + 1)]


def _warn_about(plan: ClusterPlan, *, picked_ports: bool) -> None:
    """Say what will not work well, before anything is written."""
    total = len(plan.nodes)
    if tolerated_faults(total) == 0:
        print(f"warning: {total} validator{'s' if total > 1 else ''} tolerate no byzantine "
              "validator (Tendermint needs n = 3f + 1: at least 4 for f = 1)"
              + ("; every validator must be up for the cluster to make progress"
                 if total > 1 else ""), file=sys.stderr)
    busy = [] if picked_ports else [n.port for n in plan.nodes if port_in_use(n.port)]
    if busy:
        print(f"warning: UDP port{'s' if len(busy) > 1 else ''} "
              f"{', '.join(map(str, busy))} of [{ADDRESS}] in use right now", file=sys.stderr)


def _print_made(plan: ClusterPlan, made: MadeCluster, *, ceremony: bool) -> None:
    out = plan.directory
    total = len(plan.nodes)
    faults = tolerated_faults(total)
    print(f"cluster {plan.chain_id!r}: {total} validator{'s' if total > 1 else ''} in {out} "
          f"(tolerates {faults} byzantine validator{'' if faults == 1 else 's'})")
    print(f"root certificate {out / ROOT_FILE} sha256 {made.root_fingerprint}")
    rows = [("NAME", "ENDPOINT", "VALIDATOR ID", "CONFIG")]
    rows += [(node.name, f"[{ADDRESS}]:{node.port}", vid, str(node.config_path))
             for node, vid in zip(plan.nodes, made.validator_ids(), strict=True)]
    print_rows(rows)
    if ceremony:
        print(f"the root key is only in {out / ROOT_HOLDER} (move it offline); each node's "
              "intermediate was signed by the ceremony")
    else:
        print(DEVELOPMENT_NOTICE)
    first = plan.nodes[0]
    print(f"start every node:  trustchain cluster up {out}")
    print(f"start one node:    trustchain serve --config {first.config_path}")
    print(f"consensus status:  trustchain cluster status {out}")
    print(f"ask one node:      trustchain health --server [{ADDRESS}]:{first.port} "
          f"--cafile {out / ROOT_FILE}")


def cmd_init(args: argparse.Namespace) -> int:
    total: int = args.validators
    if total < 1:
        raise ValueError(f"--validators {total}: a cluster needs at least 1 validator")
    out = Path(args.out).resolve()
    existing = _replaceable(out, force=args.force)
    ports = _node_ports(args.base_port, total)
    domains: list[str] = args.domain or list(config.DnsDomainsConfig().trustchain_domains)
    plan = ClusterPlan.of(out, ports, chain_id=args.chain_id, domains=domains)
    plan.check()
    _warn_about(plan, picked_ports=args.base_port == 0)
    remove_cluster_files(existing)  # --force
    made = make_cluster(plan, ceremony=args.ceremony)
    _print_made(plan, made, ceremony=args.ceremony)
    return 0


# --- up ---------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    cluster = load_cluster(Path(args.dir).resolve())
    missing = [str(p) for p in [cluster.root, *(m.config for m in cluster.members)]
               if not p.is_file()]
    if missing:
        raise ValueError(f"missing: {', '.join(missing)}")
    supervisor = Supervisor(cluster, wait=args.wait, stop_timeout=args.stop_timeout,
                            engine=args.engine,
                            restart=None if args.no_restart else RestartPolicy())
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
