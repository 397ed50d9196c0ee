"""The nodes of a run: which rank runs where, and the storage every node must share.

A node is named by its host name *and* the address its ranks reach the rendezvous from: host
names alone can coincide (containers, network namespaces, cloned images) or resolve to
loopback; the local address on the route to MASTER_ADDR is what the other nodes really use.

Shared storage: the output folder (checkpoints, the adapter, the Ray Train storage under it)
and the SVD cache are written by some ranks and read by others (a resumed rank reads the files
it wrote before, wherever Ray places it next; rank 0 writes the adapter the evaluation reads).
`check_shared_storage` makes sure every rank sees the same folders before anything is written:
rank 0 leaves a fresh token in each, and a rank that cannot read it back (a node that does not
mount the shared disk at that path) stops the run with one message naming the ranks, nodes and
folders, on every rank.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline.config import ConfigError
from tsd import collectives


class SharedStorageError(ConfigError):
    """A folder every node must share is not the same folder on every node."""


@dataclass
class Node:
    host: str
    address: str
    ranks: list[int] = field(default_factory=list)
    cpus: int = 0  # threads torch uses per rank on this node
    gpus: int = 0

    def label(self) -> str:
        return f"{self.host}@{self.address}"


def this_address() -> str:
    """This process's address towards the rendezvous host (MASTER_ADDR), else its host's."""
    master = os.environ.get("MASTER_ADDR")
    if master:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((master, 9))  # UDP: no packet is sent, the route picks the address
                return s.getsockname()[0]
        except OSError:
            pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def gather_nodes(rank: int, world: int) -> list[Node]:
    """Every rank's node, grouped: the same list on every rank, nodes in order of their first rank."""
    mine = (socket.gethostname(), this_address(), rank, torch.get_num_threads(),
            torch.cuda.device_count() if torch.cuda.is_available() else 0)
    everyone = collectives.all_gather_object(mine)
    nodes: dict[tuple[str, str], Node] = {}
    for host, address, r, cpus, gpus in everyone:
        node = nodes.setdefault((host, address), Node(host, address, cpus=0, gpus=gpus))
        node.ranks.append(r)
        node.cpus += cpus
    return list(nodes.values())


def node_table(nodes: list[Node]) -> list[dict]:
    return [asdict(n) for n in nodes]


def check_shared_storage(folders: dict[str, Path], rank: int, world: int) -> None:
    """Every rank must see what rank 0 writes in each folder (name -> path); see the module doc."""
    if world == 1 or not folders:
        return
    token = collectives.broadcast_object(uuid.uuid4().hex if rank == 0 else None, src=0)
    marker = f".tsd-shared-{token}"
    if rank == 0:
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / marker).write_text(token)
    collectives.barrier()
    unseen = [name for name, folder in folders.items() if not _reads(folder / marker, token)]
    report = collectives.all_gather_object((rank, socket.gethostname(), this_address(), unseen))
    collectives.barrier()  # every rank has looked before rank 0 cleans up
    if rank == 0:
        for folder in folders.values():
            (folder / marker).unlink(missing_ok=True)
    missing = [(r, host, address, names) for r, host, address, names in report if names]
    if missing:
        who = "; ".join(f"rank {r} on {host} ({address}) cannot see {', '.join(f'{n} {folders[n]}' for n in names)}"
                        for r, host, address, names in missing)
        raise SharedStorageError(
            f"shared storage: {who}, which rank 0 wrote. Every node must mount these folders at the same path "
            "(a shared disk: NFS, a cluster file system): checkpoints, the adapter and the SVD cache are written "
            "on one node and read on another"
        )


def _reads(path: Path, token: str) -> bool:
    try:
        return path.read_text() == token
    except OSError:
        return False


def shared_folders(cfg) -> dict[str, Path]:
    """The folders of `cfg` that every node must share, by their config key."""
    folders = {"output_dir": Path(cfg.output_dir).resolve()}
    if cfg.method.svd_cache:
        folders["method.svd_cache"] = Path(cfg.method.svd_cache).resolve()
    return folders


def start_system_metrics(run_id: str | None, tracking_uri: str | None, nodes: list[Node], rank: int,
                         every_s: float):
    """MLflow's system metrics (CPU, memory, disk, network, GPU) of this node, as `system/node<i>/...`
    in the run, sampled by the node's first rank; None on the other ranks or without a run."""
    index = next((i for i, n in enumerate(nodes) if n.ranks and n.ranks[0] == rank), None)
    if index is None or run_id is None:
        return None
    # Deferred: only runs that ask for system metrics load MLflow's monitor (and psutil) here.
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, node_id=f"node{index}",
                                   tracking_uri=tracking_uri)
    monitor.start()
    return monitor
