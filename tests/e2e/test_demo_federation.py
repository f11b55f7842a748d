"""The README's federation demo: three provinces as three processes, a cross-province find."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def _three_free_ports() -> int:
    """A port p with p, p+1 and p+2 free on loopback now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + 2 >= 65536:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", base + 1))
                b.bind(("127.0.0.1", base + 2))
            return base
        except OSError:
            continue
    raise AssertionError("no three consecutive free ports")


def test_demo_federation_finds_and_opens_a_study_of_another_province(tmp_path: Path) -> None:
    port = _three_free_ports()
    proc = subprocess.run(
        [sys.executable, "-m", "imaging_gateway", "demo", "--federation", "--no-serve",
         "--dir", str(tmp_path / "demo"), "--patients", "8", "--listen", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=240, env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "(HTTP 201)" in out
    held = {line.rsplit(" ", 1)[-1] for line in out.splitlines() if " held by " in line}
    assert "110000" in held and held - {"110000"}
    assert "through Beijing: HTTP 200" in out
    for p in ("110000", "310000", "440000"):
        assert (tmp_path / "demo" / p / "index.sqlite3").exists()
