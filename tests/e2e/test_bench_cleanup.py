"""A benchmark run leaves nothing behind: no temporary files, no process.

The benchmarks' figures are not tested (they are scripts, run by hand); what they leave on
the machine is. ``bench/federation.py`` at its smallest sizes (~25 s): three gateway
processes, fake peers, ~90 MB of stores and indexes in a temporary directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_federation_bench_removes_its_temporary_directory(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = subprocess.run(
        [sys.executable, "bench/federation.py", "--rounds", "3", "--slow-rounds", "1",
         "--instances-per-series", "1"],
        cwd=REPO, env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True, text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1])["bench"] == "federation"
    assert sorted(p.name for p in tmp.iterdir()) == []
    assert _processes_mentioning(str(tmp)) == []
