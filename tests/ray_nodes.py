"""Real Ray clusters of several raylets on this machine, for tests where nodes matter.

Not `ray.cluster_utils.Cluster`: its nodes share one IP while Ray Train numbers nodes (node_rank, local ranks) by
IP (train/v2/.../worker_group.py), and it starts them inside the test process; these are raylets started with
`ray start` on distinct loopback addresses, as users start them, that a test can SIGKILL as a machine dies."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class LocalRayCluster:
    """A head raylet on 127.0.0.1 and one more raylet per extra node on 127.0.0.2, 127.0.0.3, ... (Ray sees
    separate nodes), with their own ports, temp dir and auth token, so they touch no other Ray on the machine;
    `stop` ends exactly the processes they started (never `ray stop`, which ends every Ray on the machine)."""

    def __init__(self, cpus_per_node: list[int]):
        self.cpus = cpus_per_node
        self.temp_dir = Path(tempfile.mkdtemp(prefix="dlm", dir="/tmp"))  # short: Ray's socket paths have a limit
        gcs_port, dashboard_port, client_port = free_ports(3)
        self.gcs = f"127.0.0.1:{gcs_port}"
        self.address = f"http://127.0.0.1:{dashboard_port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
        # The raylets pass their environment on to jobs and workers: venv first on PATH (the job runs
        # `python -m distlm.cli`), DeepSpeed's compiled-op cache, and a token of their own.
        self.env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0",
                        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", f"{REPO}/build/torch_extensions"))
        self._common = ["--object-store-memory=200000000", f"--temp-dir={self.temp_dir}",
                        "--dashboard-agent-listen-port=0", "--metrics-export-port=0", "--disable-usage-stats"]
        self.head = [str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
                     "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client_port}",
                     f"--num-cpus={cpus_per_node[0]}", *self._common]

    def node_ip(self, node: int) -> str:
        return f"127.0.0.{node + 1}"

    def start_node(self, node: int) -> None:
        command = self.head if node == 0 else [
            str(BIN / "ray"), "start", f"--address={self.gcs}", f"--node-ip-address={self.node_ip(node)}",
            f"--num-cpus={self.cpus[node]}", *self._common]
        subprocess.run(command, env=self.env, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        for node in range(len(self.cpus)):
            self.start_node(node)

    def processes(self, node: int | None = None) -> list[psutil.Process]:
        """Every process of this cluster (those naming its temp dir, and their children), or of one node: its
        raylet (started with the node's IP) and the processes under it."""
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                args = p.info["cmdline"] or ()
                if p.pid == os.getpid() or not any(str(self.temp_dir) in a for a in args):
                    continue
                if node is None or any(a == f"--node_ip_address={self.node_ip(node)}" for a in args):
                    found.update({q.pid: q for q in [p, *p.children(recursive=True)]})
            except psutil.NoSuchProcess:
                pass
        return list(found.values())

    def kill_node(self, node: int) -> int:
        """SIGKILL a node's raylet and everything under it, as when a machine dies. Returns how many."""
        procs = self.processes(node)
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        return len(procs)

    def alive_nodes(self) -> int:
        out = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", self.address, "--filter", "state=ALIVE",
                              "--format", "json"], env=self.env, check=True, capture_output=True, text=True)
        return len(json.loads(out.stdout))

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def actors(self, class_name: str) -> list[dict]:
        out = subprocess.run([str(BIN / "ray"), "list", "actors", "--address", self.address, "--filter",
                              f"class_name={class_name}", "--format", "json", "--limit", "1000"],
                             env=self.env, check=True, capture_output=True, text=True)
        return json.loads(out.stdout)


@contextmanager
def started(cluster: LocalRayCluster):
    """The cluster, started; stopped afterwards, whatever happened, with none of its processes left behind."""
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        assert not cluster.processes(), "Ray processes of the test cluster outlived it"
