"""The README's first command: `imaging-gateway demo` writes, indexes and serves synthetic studies."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.gateway import ForkedGateway, free_port


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_demo_serves_indexed_studies_with_the_tokens_it_prints(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "demo.log"
    with out.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imaging_gateway", "demo", "--dir", str(tmp_path / "demo"),
             "--patients", "3", "--listen", f"127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while _healthy(port) is False:
            assert proc.poll() is None, out.read_text()[-3000:]
            assert time.monotonic() < deadline, "the demo never served"
            time.sleep(0.3)
        text = out.read_text()
        tokens = dict(re.findall(r"export (\w+)=(\S+)", text))
        base = f"http://127.0.0.1:{port}"
        status, body = _get(f"{base}/admin/index/stats", tokens["TOKEN"])
        assert status == 200
        stats = json.loads(body)
        assert stats["studies"] > 0 and stats["instances"] > 0 and stats["quarantined"] >= 0
        status, body = _get(f"{base}/dicomweb/studies?limit=5", tokens["PACS_TOKEN"])
        assert status == 200 and 0 < len(json.loads(body)) <= 5
        assert _get(f"{base}/dicomweb/studies")[0] == 401
        assert "Traceback" not in text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_readme_commands_with_relative_paths_share_one_key(tmp_path: Path) -> None:
    """From the repo root: `demo --dir demo-data`, then the README's commands with
    `--config demo-data/gateway.toml` and with the absolute path all use the same keys
    (a token the demo printed is accepted by `serve --config /abs/...`), and
    `audit verify` finds the audit key; nothing lands in demo-data/demo-data."""
    port = free_port()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "imaging_gateway", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    demo = run("demo", "--dir", "demo-data", "--patients", "2", "--no-serve",
               "--listen", f"127.0.0.1:{port}")
    assert demo.returncode == 0, demo.stderr[-3000:]
    tokens = dict(re.findall(r"export (\w+)=(\S+)", demo.stdout))
    relative = run("tokens", "issue", "--config", "demo-data/gateway.toml", "--role", "admin")
    assert relative.returncode == 0, relative.stderr[-3000:]
    assert not (tmp_path / "demo-data" / "demo-data").exists()
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("token-signing.pem")] == [
        Path("demo-data/keys/token-signing.pem")
    ]
    gw = ForkedGateway((tmp_path / "demo-data" / "gateway.toml").absolute(), port)
    gw.start(timeout=60)
    try:
        for token in (tokens["TOKEN"], relative.stdout.strip()):
            status, body = _get(f"{gw.base}/admin/index/stats", token)
            assert status == 200, body
    finally:
        gw.stop()
    verify = run("audit", "verify", "--config", "demo-data/gateway.toml")
    assert verify.returncode == 0 and "intact" in verify.stdout, verify.stderr[-3000:]
