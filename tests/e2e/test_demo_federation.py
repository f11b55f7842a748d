"""The README's federation demo: three provinces as three processes, a cross-province find."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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


def _children(pid: int) -> set[int]:
    """The process ids whose parent is ``pid`` (from /proc)."""
    found: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # SO_REUSEADDR: connections in TIME_WAIT do not count, a listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_demo_federation_finds_a_remote_study_then_sigterm_stops_its_gateways(
        tmp_path: Path) -> None:
    """`demo --federation` from the repo root (relative --dir): three provinces indexed, a
    consent at home, a federated search finds the patient's studies in other provinces and
    one is opened through Beijing; then, serving, SIGTERM to it stops the three gateway
    processes and frees their ports."""
    port = _three_free_ports()
    out = tmp_path / "demo.out"
    with out.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imaging_gateway", "demo", "--federation", "--dir",
             "demo-data", "--patients", "8", "--listen", f"127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=dict(os.environ),
        )
    try:
        # Generous wait: set-up indexes three provinces, then the walk-through runs.
        for _ in range(2400):
            if "demo: serving" in out.read_text():
                break
            assert proc.poll() is None, out.read_text()[-3000:]
            time.sleep(0.1)
        else:
            raise AssertionError(f"the demo never served: {out.read_text()[-3000:]}")
        text = out.read_text()
        assert "(HTTP 201)" in text
        held = {line.rsplit(" ", 1)[-1] for line in text.splitlines() if " held by " in line}
        assert "110000" in held and held - {"110000"}, text[-3000:]
        assert "through Beijing: HTTP 200" in text
        for p in ("110000", "310000", "440000"):
            assert (tmp_path / "demo-data" / p / "index.sqlite3").exists()
        assert all(_healthy(p) for p in (port, port + 1, port + 2))
        gateways = _children(proc.pid)
        assert len(gateways) == 3, gateways
        assert not any(_port_free(p) for p in (port, port + 1, port + 2))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        assert not [pid for pid in gateways if _alive(pid)], out.read_text()[-3000:]
        assert all(_port_free(p) for p in (port, port + 1, port + 2))
        assert "Traceback" not in out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _children(proc.pid) | locals().get("gateways", set()):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_demo_port_in_use_is_one_line(tmp_path: Path) -> None:
    port = _three_free_ports()
    with socket.socket() as held:
        held.bind(("127.0.0.1", port + 1))
        held.listen()
        out = subprocess.run(
            [sys.executable, "-m", "imaging_gateway", "demo", "--federation", "--no-serve",
             "--dir", str(tmp_path / "demo"), "--listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=240,
        )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--listen" in lines[0] and f"{port + 1}" in lines[0], lines
