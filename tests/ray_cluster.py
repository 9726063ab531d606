"""A real multi-node Ray cluster on one machine, for tests: `ray start --head --block` plus N `ray start --block`
worker nodes, each a separate process group, each with its own custom resource, scratch dir and Ray temp dir.

    from tests.ray_cluster import LocalCluster, local_cluster   # `local_cluster`: a pytest fixture

    with LocalCluster(tmp_path, workers=2, cpus_per_node=1) as c:
        ray.init(address=c.address)                   # the driver attaches to the head node
        ...ray.remote(resources={"node_w0": 0.01})...  # pin work to worker 0
        subprocess.run(["ray", "job", "submit", "--address", c.dashboard_url, "--", "python", "x.py"], env=c.env())
        c.kill_worker(1, wait_dead=True)             # SIGKILL every process of worker node 1 at once (a lost machine)
        c.restart_worker(1)                          # the node comes back (new node id, same resource and scratch)

Layout and choices:
- The head has `head_cpus` CPUs (default 0: no task or actor that needs a CPU lands on it, so work really runs on
  the workers) and the custom resource `node_head` (100 units) for pinning CPU-less things to it.
- Worker i has `cpus_per_node` CPUs, the custom resource `node_w<i>` (1 unit; ask for a fraction, e.g. 0.01, to
  pin several things), and the environment PIPELINE_SCRATCH = TMPDIR = scratch_dirs[i]. Raylets start their
  worker processes with their own environment, so every task/actor on worker i sees worker i's values.
- Ray's node IP is the host's address, not 127.0.0.1 (Ray turns a loopback --node-ip-address into the host IP);
  the dashboard binds to 127.0.0.1. The GCS, dashboard and Ray-client ports are picked free here (so workers can
  start at the same time as the head); every other port is 0 (Ray lets the OS pick, so no race between picks).
- Ray temp dirs are short dirs under /tmp (unix socket paths must stay under ~107 bytes); they are deleted at
  teardown unless LOCAL_CLUSTER_KEEP=1 (each node's --temp-dir is its own: Ray allows one per node on one host;
  the session name is shared). The `ray start` output is in <tmp_dir>/logs/{h,w0,w1,w1.1,...}.log.
- Failure detection is sped up (GCS health checks every 500 ms, dead after 3 misses) unless fast_failure=False
  (Ray's default is 3 s x 5). Graceful drain on SIGTERM is off (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0).
- Every process of the cluster carries LOCAL_CLUSTER_ID=<uid>:<node> in its environment; teardown and kill_worker
  find processes by it (Ray core workers put themselves in their own process groups, so a process-group kill alone
  misses them). A watchdog process kills the cluster if the test process dies without tearing down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY_BIN = str(Path(sys.executable).with_name("ray"))
MARKER = "LOCAL_CLUSTER_ID"

_WATCHDOG = r"""
import os, shutil, signal, sys, time
parent, tag, root = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3]
while os.getppid() == parent:  # reparented once the test process is gone (even while it is a zombie)
    time.sleep(1)
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if tag in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
time.sleep(1)
shutil.rmtree(root, ignore_errors=True)
"""


def _free_ports(n: int) -> list[int]:
    """n distinct ports that are free on all interfaces right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pids_with(tag: bytes) -> list[int]:
    """Pids of this user's live processes whose environment contains `tag`."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if tag in f.read():
                    out.append(int(name))
        except OSError:  # gone, a zombie, or not ours
            pass
    return out


def _signal_all(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class LocalCluster:
    def __init__(
        self,
        tmp_dir: str | os.PathLike | None = None,
        workers: int = 2,
        cpus_per_node: int = 1,
        head_cpus: int = 0,
        object_store_mb: int = 256,
        fast_failure: bool = True,
        system_config: dict | None = None,
        extra_env: dict | None = None,
        startup_timeout_s: float = 90,
        worker_log_monitor: bool = True,
    ):
        self.tmp_dir = Path(tmp_dir or tempfile.mkdtemp(prefix="localcluster-"))
        self.workers = workers
        self.cpus_per_node = cpus_per_node
        self.head_cpus = head_cpus
        self.object_store_bytes = object_store_mb * 1024 * 1024
        self.system_config = dict(system_config or {})
        if fast_failure:
            self.system_config = {
                "health_check_period_ms": 500,
                "health_check_timeout_ms": 500,
                "health_check_failure_threshold": 3,
                **self.system_config,
            }
        self.extra_env = dict(extra_env or {})
        self.worker_log_monitor = worker_log_monitor  # False: prints of worker-node tasks no longer reach drivers
        self.startup_timeout_s = startup_timeout_s
        self.uid = uuid.uuid4().hex[:12]
        self.log_dir = self.tmp_dir / "logs"
        self.head_scratch = self.tmp_dir / "scratch" / "head"
        self.scratch_dirs = [self.tmp_dir / "scratch" / f"w{i}" for i in range(workers)]
        self._ray_root: Path | None = None  # short dir under /tmp holding each node's --temp-dir
        self._procs: dict[str, subprocess.Popen] = {}  # node -> its `ray start --block`
        self._temp: dict[str, str] = {}  # node -> its --temp-dir name (and log name) under _ray_root
        self._node_ids: dict[str, str] = {}
        self._watchdog: subprocess.Popen | None = None
        self._gcs = None
        self._gcs_port = 0
        self.address = ""  # GCS "ip:port", for ray.init(address=...) and `ray start --address`
        self.dashboard_url = ""  # "http://127.0.0.1:port", for `ray job submit --address` / JobSubmissionClient
        self.startup_s = None  # seconds from start() to every node alive and the dashboard answering

    # ---- public API ------------------------------------------------------------------------------------------
    def node_ids(self) -> list[str]:
        """Node ids (hex) of the worker nodes, index i = worker i (a killed worker keeps its id until restarted)."""
        return [self._node_ids[f"w{i}"] for i in range(self.workers)]

    @property
    def head_node_id(self) -> str:
        return self._node_ids["head"]

    @staticmethod
    def resource(i: int) -> str:
        """The custom resource that pins work to worker i: `.options(resources={c.resource(i): 0.01})`."""
        return f"node_w{i}"

    def env(self, **extra) -> dict:
        """Environment for a subprocess driver: `ray.init()` attaches to this cluster, `ray job submit` finds its
        dashboard. The cluster's own marker and scratch variables are not in it."""
        env = {k: v for k, v in os.environ.items() if k not in (MARKER, "PIPELINE_SCRATCH")}
        env.update(
            RAY_ADDRESS=self.address,
            RAY_API_SERVER_ADDRESS=self.dashboard_url,
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        )
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def pids(self, node: str | None = None) -> list[int]:
        """Live pids of one node ('head', 'w0', ...) or of the whole cluster (node=None)."""
        tag = f"{MARKER}={self.uid}:" + (f"{node}\0" if node else "")
        return _pids_with(tag.encode())

    def kill_worker(self, i: int, wait_dead: bool = False, timeout_s: float = 60) -> float | None:
        """Lose worker node i the way a machine dies: freeze all its processes (raylet with its object store,
        agents, core workers, the `ray start` process) with SIGSTOP so none can react, then SIGKILL them all.
        With wait_dead, waits until the GCS marks the node dead and returns the seconds from the kill."""
        node = f"w{i}"
        proc = self._procs.get(node)
        pids = set(self.pids(node)) | ({proc.pid} if proc is not None else set())
        _signal_all(pids, signal.SIGSTOP)
        pids |= set(self.pids(node))  # anything forked meanwhile
        _signal_all(pids, signal.SIGSTOP)
        t0 = time.monotonic()
        _signal_all(pids, signal.SIGKILL)
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(10)
        if wait_dead:
            self.wait_node_state(self._node_ids[node], alive=False, timeout_s=timeout_s)
            return time.monotonic() - t0
        return None

    def restart_worker(self, i: int) -> str:
        """Start worker i again (after kill_worker): same resource and scratch dir, a new node id, which it returns."""
        node = f"w{i}"
        if node in self._procs and self._procs[node].poll() is None:
            raise RuntimeError(f"worker {i} is still running")
        gen = 1
        while f"{node}.{gen}" in self._temp.values() or (self._ray_root / f"{node}.{gen}").exists():
            gen += 1
        self._node_ids.pop(node, None)
        self._spawn_worker(i, f"{node}.{gen}")
        self._wait_ready([node])
        return self._node_ids[node]

    def wait_node_state(self, node_id: str, alive: bool, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self._gcs_nodes().get(node_id)
            if info is not None and (info.state == 0) == alive:
                return
            time.sleep(0.05)
        raise TimeoutError(f"node {node_id} not {'alive' if alive else 'dead'} after {timeout_s}s")

    def alive_node_ids(self) -> list[str]:
        return [k for k, v in self._gcs_nodes().items() if v.state == 0]

    def tail(self, node: str, n: int = 30) -> str:
        """The last n lines of a node's `ray start` output."""
        try:
            text = (self.log_dir / f"{self._temp.get(node, node)}.log").read_text(errors="replace")
            return "\n".join(text.splitlines()[-n:])
        except OSError:
            return ""

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> "LocalCluster":
        t0 = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _node_env(self, node: str, scratch: Path) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env.update(
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONUNBUFFERED="1",
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM stops a node at once, not after a 30 s drain
            PIPELINE_SCRATCH=str(scratch),
            TMPDIR=str(scratch),
            PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),  # `python`
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        )
        env.update({k: str(v) for k, v in self.extra_env.items()})
        env[MARKER] = f"{self.uid}:{node}"
        return env

    def _spawn(self, node: str, temp: str, args: list[str], scratch: Path) -> None:
        scratch.mkdir(parents=True, exist_ok=True)
        self._temp[node] = temp
        with open(self.log_dir / f"{temp}.log", "wb") as log:
            self._procs[node] = subprocess.Popen(
                [RAY_BIN, "start", "--block", "--disable-usage-stats", f"--temp-dir={self._ray_root / temp}", *args],
                env=self._node_env(node, scratch),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=scratch,
            )

    def _spawn_worker(self, i: int, temp: str) -> None:
        # `ray start` turns a loopback address into the host IP itself
        self._spawn(
            f"w{i}",
            temp,
            [
                f"--address=127.0.0.1:{self._gcs_port}",
                f"--num-cpus={self.cpus_per_node}",
                f"--resources={json.dumps({self.resource(i): 1})}",
                f"--object-store-memory={self.object_store_bytes}",
                "--dashboard-agent-listen-port=0",
                f"--include-log-monitor={str(self.worker_log_monitor).lower()}",
            ],
            self.scratch_dirs[i],
        )

    def _start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._ray_root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), f"{MARKER}={self.uid}:", str(self._ray_root)],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
        self._gcs_port, dash_port = _free_ports(2)
        self.dashboard_url = f"http://127.0.0.1:{dash_port}"
        head = [
            "--head",
            f"--port={self._gcs_port}",
            f"--num-cpus={self.head_cpus}",
            f"--resources={json.dumps({'node_head': 100})}",
            f"--object-store-memory={self.object_store_bytes}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            "--dashboard-agent-listen-port=0",
        ]
        head += [f"--ray-client-server-port={_free_ports(1)[0]}"]  # it cannot be turned off; keep off 10001
        if self.system_config:
            head.append(f"--system-config={json.dumps(self.system_config)}")
        self._spawn("head", "h", head, self.head_scratch)
        for i in range(self.workers):  # at once: a worker that finds no GCS yet retries once a second
            self._spawn_worker(i, f"w{i}")
        self._wait_ready(["head", *(f"w{i}" for i in range(self.workers))])

    def _wait_ready(self, nodes: list[str]) -> None:
        """Until each node is ALIVE in the GCS (its id recorded), its `ray start` says it is done (the GCS lists a
        node while `ray start` still starts its agents, and a SIGTERM in that window takes ~30 s to act on), and
        the dashboard answers."""
        deadline = time.monotonic() + self.startup_timeout_s
        roots = {node: f"{self._ray_root / self._temp[node]}/" for node in nodes}
        while True:
            for node in nodes:
                p = self._procs[node]
                if p.poll() is not None:
                    raise RuntimeError(f"`ray start` for {node} exited with {p.returncode}:\n" + self.tail(node))
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not up after {self.startup_timeout_s}s; logs in {self.log_dir}")
            try:
                if self._gcs is None:
                    with socket.socket() as sock:  # GcsClient() blocks ~30 s on a GCS that is not up yet
                        if sock.connect_ex(("127.0.0.1", self._gcs_port)) != 0:
                            time.sleep(0.1)
                            continue
                    from ray._private.services import get_node_ip_address
                    from ray._raylet import GcsClient

                    # the IP `ray start` gives the nodes (it never uses loopback); the GCS listens on all interfaces
                    self.address = f"{get_node_ip_address()}:{self._gcs_port}"
                    self._gcs = GcsClient(address=self.address)
                for nid, info in self._gcs_nodes().items():
                    for node, root in roots.items():
                        if info.state == 0 and info.raylet_socket_name.startswith(root):
                            self._node_ids[node] = nid
                if all(n in self._node_ids and "Ray runtime started." in self.tail(n, 200) for n in nodes):
                    with urllib.request.urlopen(self.dashboard_url + "/api/version", timeout=2) as r:
                        if r.status == 200:
                            return
            except OSError:
                pass  # the dashboard is not answering yet
            except Exception as e:  # GCS RPC errors while it starts
                if "RpcError" not in type(e).__name__ and "navailable" not in str(e):
                    raise
            time.sleep(0.1)

    def _gcs_nodes(self) -> dict:
        return {k.hex(): v for k, v in self._gcs.get_all_node_info(timeout=5).items()}

    def stop(self, grace_s: float = 2.0) -> None:
        """SIGTERM every node's `ray start` process group, then SIGKILL the groups and every marked process (core
        workers sit in process groups of their own) still there after grace_s. Safe to call twice and after a
        partial start."""
        procs = list(self._procs.values())
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (self.pids() or any(p.poll() is None for p in procs)):
            time.sleep(0.1)
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for _ in range(10):
            left = self.pids()
            if not left:
                break
            _signal_all(left, signal.SIGKILL)
            time.sleep(0.1)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        self._gcs = None
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog = None
        if self._ray_root is not None and os.environ.get("LOCAL_CLUSTER_KEEP") != "1":
            shutil.rmtree(self._ray_root, ignore_errors=True)
            self._ray_root = None

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


try:
    import pytest

    @pytest.fixture
    def local_cluster(tmp_path):
        """A started 2-worker LocalCluster (1 CPU per worker, head with 0 CPUs); always torn down."""
        with LocalCluster(tmp_path, workers=2, cpus_per_node=1) as cluster:
            yield cluster
except ImportError:  # pragma: no cover
    pass
