"""Gateways for end-to-end tests: config on disk, `imaging-gateway serve` (a process, or
the same server in a thread of the test process), HTTP."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import io
import json
import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli_process(config: Path, *args: str, env: dict[str, str] | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``imaging-gateway ARGS --config CONFIG`` in a new Python (what benchmarks time)."""
    cmd = [sys.executable, "-m", "imaging_gateway", args[0], "--config", str(config), *args[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def cli(config: Path, *args: str, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``imaging-gateway ARGS --config CONFIG`` in a process of its own.

    The process is forked from a server that imported the gateway once (``_cli_processes``):
    its own stdout, stderr, environment, working directory, logging and exit status, as
    ``python -m imaging_gateway`` has, without a Python start-up and imports (~1.5 s of
    CPU) per command.
    """
    argv = [args[0], "--config", str(config), *args[1:]]
    with tempfile.TemporaryDirectory(prefix="ig-cli-") as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        child = _cli_processes().Process(
            target=_cli_child, args=(argv, os.getcwd(), {**os.environ, **(env or {})}, out, err))
        child.start()
        child.join(300)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise AssertionError(f"imaging-gateway {argv} did not end within 300 s")
        proc = subprocess.CompletedProcess(
            ["imaging-gateway", *argv], child.exitcode,
            out.read_text(encoding="utf-8", errors="replace"),
            err.read_text(encoding="utf-8", errors="replace"))
    if check and proc.returncode != 0:
        raise AssertionError(f"{proc.args} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


@functools.cache
def _cli_processes() -> multiprocessing.context.ForkServerContext:
    """A fork server that imported the command line and what its commands load."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.support.gateway", "imaging_gateway.cli",
                                    "imaging_gateway.app", "imaging_gateway.sync.runner"])
    return context


def _cli_child(argv: list[str], cwd: str, environ: dict[str, str], out: Path,
               err: Path) -> None:
    """What the console script does (``sys.exit(main())``), in a forked child."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environ)
    opened = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(opened, 1)
    os.close(opened)
    if err == out:
        os.dup2(1, 2)
    else:
        opened = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(opened, 2)
        os.close(opened)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
    status: int = 1
    try:
        from imaging_gateway.cli import main

        status = main(argv)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            status = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)


def issue_token(config: Path, *args: str) -> str:
    """What ``imaging-gateway tokens issue ARGS --config CONFIG`` prints, issued in this process.

    The CLI's own parser and command with the gateway's key file: the same token without a
    Python start-up (about a second of CPU) per token.
    """
    from imaging_gateway import cli as gateway_cli
    from imaging_gateway.settings import load_settings

    parsed = gateway_cli._parser().parse_args(["tokens", "issue", "--config", str(config), *args])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = gateway_cli._tokens(load_settings(config), parsed)
    assert status == 0, f"tokens issue {args} returned {status}"
    return out.getvalue().strip()


class ForkedProcess:
    """The ``subprocess.Popen`` calls the tests make, on a process ``_cli_processes`` forked."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    def poll(self) -> int | None:
        return self._process.exitcode

    def terminate(self) -> None:
        self._process.terminate()

    def kill(self) -> None:
        self._process.kill()

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(f"forked process {self.pid}", timeout or 0.0)
        return self._process.exitcode


class GatewayProcess:
    """``imaging-gateway serve`` on a free loopback port.

    With ``ssl_context`` (a client context trusting the gateway's CA) the gateway is
    expected to serve HTTPS ([tls] in its config), and ``base`` is an https URL.
    """

    def __init__(self, config: Path, port: int, env: dict[str, str] | None = None, *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.port = port
        self.ssl_context = ssl_context
        self.base = f"{'http' if ssl_context is None else 'https'}://127.0.0.1:{port}"
        self.log = config.parent / f"gateway-{port}.log"
        self._env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | ForkedProcess | None = None

    def _launch(self) -> subprocess.Popen[bytes] | ForkedProcess:
        with self.log.open("wb") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "imaging_gateway", "serve", "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, env=self._env,
            )

    def start(self, timeout: float = 30.0) -> None:
        self.proc = self._launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=1,
                                            context=self.ssl_context) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"gateway did not come up: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def logs(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


class ForkedGateway(GatewayProcess):
    """``GatewayProcess`` forked from the server ``cli()`` uses: a process of its own
    (signals, peak memory, its log) without a Python start-up and imports per gateway.
    Benchmarks time the real start-up: they use ``GatewayProcess``."""

    def _launch(self) -> ForkedProcess:
        child = _cli_processes().Process(
            target=_cli_child,
            args=(["serve", "--config", str(self.config)], os.getcwd(), self._env,
                  self.log, self.log))
        child.start()
        return ForkedProcess(child)


class InProcessGateway(GatewayProcess):
    """What ``imaging-gateway serve`` runs (the same app, runner, request handler and access
    logger), in a thread of the test process with its own event loop, on a real port.

    For single-gateway tests where a process adds nothing: no Python start-up and imports
    (about 1.5 s of CPU) per gateway. Tests of signals, exit codes, peak memory or several
    processes of one province use :class:`GatewayProcess`. ``logs()`` holds every record
    logged in the test process while the gateway ran, at the levels ``serve`` sets: a
    superset of the gateway's own, so "nothing leaks into the log" checks only get stricter.
    """

    def __init__(self, config: Path, port: int, env: dict[str, str] | None = None, *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(config, port, env, ssl_context=ssl_context)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._handler: logging.Handler | None = None

    def start(self, timeout: float = 30.0) -> None:
        from imaging_gateway.api.logging import SafeAccessLogger
        from imaging_gateway.api.server import serve
        from imaging_gateway.app import create_app
        from imaging_gateway.crypto.tls import server_context
        from imaging_gateway.settings import load_settings

        settings = load_settings(self.config, environ=self._env)
        server_ssl = server_context(settings.tls) if settings.tls.enabled else None
        self._handler = _capture_logs(self.log)
        started: concurrent.futures.Future[None] = concurrent.futures.Future()

        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()
            await serve(create_app(settings), host=settings.gateway.listen_host,
                        port=settings.gateway.listen_port, ssl_context=server_ssl,
                        access_log_class=SafeAccessLogger, handle_signals=False,
                        on_serving=lambda: started.set_result(None))

        def thread() -> None:
            try:
                asyncio.run(run())
            except asyncio.CancelledError:
                pass
            except BaseException as exc:  # start-up failed: hand it to start()
                if not started.done():
                    started.set_exception(exc)
                else:
                    raise

        self._thread = threading.Thread(target=thread, name=f"gateway-{self.port}", daemon=True)
        self._thread.start()
        try:
            started.result(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            if self._loop is not None and self._task is not None:
                self._loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join(30)
            assert not self._thread.is_alive(), "the in-process gateway did not stop"
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    def logs(self) -> str:
        if self._handler is not None:
            self._handler.flush()
        return self.log.read_text(encoding="utf-8", errors="replace")


def _capture_logs(path: Path) -> logging.Handler:
    """A handler on the root logger writing to ``path`` at the levels ``serve`` logs at."""
    from imaging_gateway.cli import quiet_loggers

    quiet_loggers()
    for name in ("imaging_gateway", "aiohttp.access"):
        if logging.getLogger(name).getEffectiveLevel() > logging.INFO:
            logging.getLogger(name).setLevel(logging.INFO)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def sync_through_api(gw: GatewayProcess, store: str, *, timeout: float = 300.0) -> dict[str, object]:
    """Index ``store`` by a sync job of the running gateway (``POST /admin/sync-jobs``).

    The same job ``imaging-gateway sync`` runs, without another Python process (its
    start-up, imports and migration check). Returns the finished job; raises
    ``AssertionError`` unless it succeeded.
    """
    admin = issue_token(gw.config, "--role", "admin")
    headers = {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"}
    req = urllib.request.Request(f"{gw.base}/admin/sync-jobs", headers=headers, method="POST",
                                 data=json.dumps({"store": store}).encode())
    with urllib.request.urlopen(req, context=gw.ssl_context) as r:
        job: dict[str, object] = json.loads(r.read())
    deadline = time.monotonic() + timeout
    while job["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
        req = urllib.request.Request(f"{gw.base}/admin/sync-jobs/{job['id']}", headers=headers)
        with urllib.request.urlopen(req, context=gw.ssl_context) as r:
            job = json.loads(r.read())
    assert job["status"] == "succeeded", job
    return job
