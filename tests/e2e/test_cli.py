"""The CLI as an admin meets it: one-line errors, exit codes, no tracebacks, JSON output."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from imaging_gateway.dicom.synthetic import SyntheticInstance, generate_instances
from tests.support.gateway import cli, free_port


def test_bad_config_is_one_line_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "g.toml"
    cfg.write_text('[gateway]\nprovince = "123"\n', encoding="utf-8")
    out = cli(cfg, "index", "stats", check=False)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "gateway.province" in lines[0]
    assert "Traceback" not in out.stderr


def test_unreachable_store_fails_the_job_with_a_clear_message(tmp_path: Path) -> None:
    cfg = tmp_path / "g.toml"
    cfg.write_text(
        f"""
[gateway]
data_dir = "data"
[[stores]]
name = "dead"
kind = "s3"
endpoint = "http://127.0.0.1:{free_port()}"
bucket = "dicom"
retries = 1
timeout_s = 2
""",
        encoding="utf-8",
    )
    out = cli(cfg, "sync", "--store", "dead", "--no-progress", check=False)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("imaging-gateway: ") and "dead" in last
    jobs = json.loads(cli(cfg, "index", "jobs", "--json").stdout)
    assert [j["status"] for j in jobs] == ["failed"]
    assert jobs[0]["error"]


def test_sync_json_summary_and_stats(tmp_path: Path) -> None:
    for inst in generate_instances(seed=3, patients=2, studies_per_patient=1,
                                   pixel_mode="small", instances_per_series=1):
        p = tmp_path / "store" / inst.key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(inst.data)
    n = sum(1 for p in (tmp_path / "store").rglob("*") if p.is_file())
    cfg = tmp_path / "g.toml"
    cfg.write_text('[gateway]\ndata_dir = "data"\n[[stores]]\nname = "fs"\nkind = "fs"\npath = "store"\n',
                   encoding="utf-8")
    summary = json.loads(cli(cfg, "sync", "--store", "fs", "--json").stdout)
    assert summary["status"] == "succeeded" and summary["indexed"] == n
    stats = json.loads(cli(cfg, "index", "stats", "--json").stdout)
    assert stats["instances"] == n and stats["quarantined"] == 0
    again = json.loads(cli(cfg, "sync", "--store", "fs", "--json").stdout)
    assert again["unchanged"] == n and again["bytes_read"] == 0
    unknown = cli(cfg, "sync", "--store", "nope", check=False)
    assert unknown.returncode == 2 and "known: fs" in unknown.stderr


def _small_store(root: Path, *, seed: int) -> list[SyntheticInstance]:
    """Two patients' one-instance studies written into a local-directory store."""
    instances = list(generate_instances(seed=seed, patients=2, studies_per_patient=1,
                                        pixel_mode="small", instances_per_series=1))
    for inst in instances:
        path = root / inst.key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(inst.data)
    return instances


def test_keys_and_seal_commands(tmp_path: Path) -> None:
    """keys init | status | rotate | rewrap | retire and seal, as an admin runs them."""
    instances = _small_store(tmp_path / "store", seed=4)
    cfg = tmp_path / "g.toml"
    cfg.write_text('[gateway]\ndata_dir = "data"\n[[stores]]\nname = "fs"\nkind = "fs"\n'
                   'path = "store"\n[encryption]\nenabled = true\n', encoding="utf-8")

    missing = cli(cfg, "sync", "--store", "fs", check=False)
    assert missing.returncode == 2 and "imaging-gateway keys init" in missing.stderr
    assert "Traceback" not in missing.stderr
    cli(cfg, "keys", "init")
    ring = tmp_path / "data" / "keys" / "keyring.json"
    assert ring.stat().st_mode & 0o777 == 0o600
    key_material = json.loads(ring.read_text())["keys"]["1"]

    sealed = cli(cfg, "seal", "--store", "fs")
    assert "sealed" in sealed.stdout and str(len(instances)) in sealed.stdout
    for inst in instances:
        assert inst.national_id.encode() not in (tmp_path / "store" / inst.key).read_bytes()
    summary = json.loads(cli(cfg, "sync", "--store", "fs", "--json").stdout)
    assert summary["indexed"] == len(instances) and summary["quarantined"] == 0

    cli(cfg, "keys", "rotate")
    refused = cli(cfg, "keys", "retire", "1", check=False)
    assert refused.returncode == 1 and "rewrap" in refused.stderr
    assert "rewrapped" in cli(cfg, "keys", "rewrap", "--store", "fs").stdout
    assert "done" in cli(cfg, "keys", "rewrap", "--store", "fs").stdout  # resumes: no work
    cli(cfg, "keys", "retire", "1")
    status = cli(cfg, "keys", "status", "--json", "--stores")
    doc = json.loads(status.stdout)
    assert (doc["versions"], doc["current"]) == ([2], 2)
    assert doc["rewrap"]["fs"]["version"] == 2
    assert key_material not in status.stdout + status.stderr

    # Everything still reads after version 1 is gone (the envelope sidecars).
    full = json.loads(cli(cfg, "sync", "--store", "fs", "--full", "--json").stdout)
    assert full["indexed"] == len(instances) and full["quarantined"] == 0
    assert full["listed"] == len(instances)  # the sidecars are not objects to index


def test_seal_index_encrypts_an_existing_index(tmp_path: Path) -> None:
    """A plain index, then [encryption] enabled: refused until `seal-index`, then served."""
    instances = _small_store(tmp_path / "store", seed=5)
    cfg = tmp_path / "g.toml"

    def config(enabled: bool) -> None:
        cfg.write_text('[gateway]\ndata_dir = "data"\n[[stores]]\nname = "fs"\nkind = "fs"\n'
                       f'path = "store"\n[encryption]\nenabled = {str(enabled).lower()}\n',
                       encoding="utf-8")

    config(False)
    cli(cfg, "sync", "--store", "fs")
    db = tmp_path / "data" / "index.sqlite3"
    assert db.exists()
    config(True)
    cli(cfg, "keys", "init")
    refused = cli(cfg, "sync", "--store", "fs", check=False)
    assert refused.returncode == 2 and "seal-index" in refused.stderr
    assert "Traceback" not in refused.stderr
    sealed = cli(cfg, "seal-index")
    assert "patients_rewritten" in sealed.stdout
    assert "patients_rewritten  0" in cli(cfg, "seal-index").stdout  # resumes: no work
    summary = json.loads(cli(cfg, "sync", "--store", "fs", "--json").stdout)
    assert summary["unchanged"] == len(instances)
    cli(cfg, "keys", "rotate")
    assert json.loads(cli(cfg, "keys", "status", "--json").stdout)["index_key_versions"] == [1]
    cli(cfg, "keys", "rewrap", "--store", "fs")  # the store's objects (plain: none to move)
    cli(cfg, "keys", "retire", "1")  # opening the index re-wrapped its key under version 2
    assert json.loads(cli(cfg, "keys", "status", "--json").stdout)["index_key_versions"] == [2]
    cli(cfg, "index", "stats")
    raw = b"".join(p.read_bytes() for p in db.parent.glob("index.sqlite3*"))
    assert not [i.national_id for i in instances if i.national_id.encode() in raw]
    assert not [i.patient_id for i in instances if i.patient_id.encode() in raw]
    config(False)
    plain = cli(cfg, "index", "stats", check=False)
    assert plain.returncode == 2 and "encrypted" in plain.stderr


def _one_line_exit_2(out: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The start-up error contract: exit 2, one stderr line naming the key or cause."""
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cfg = tmp_path / "g.toml"
        cfg.write_text(f'[gateway]\nlisten = "127.0.0.1:{port}"\n', encoding="utf-8")
        _one_line_exit_2(cli(cfg, "serve", check=False), "gateway.listen", f"{port}", "in use")
        demo = subprocess.run(
            [sys.executable, "-m", "imaging_gateway", "demo", "--dir", str(tmp_path / "demo"),
             "--patients", "1", "--listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=300,
        )
        _one_line_exit_2(demo, "listen", f"{port}", "in use")


def test_unusable_data_dir_is_one_line(tmp_path: Path) -> None:
    """root ignores modes: a data_dir under a regular file is one nobody can create."""
    (tmp_path / "afile").write_text("", encoding="utf-8")
    cfg = tmp_path / "g.toml"
    cfg.write_text(f'[gateway]\ndata_dir = "afile/data"\nlisten = "127.0.0.1:{free_port()}"\n',
                   encoding="utf-8")
    for args in (("index", "stats"), ("serve",), ("tokens", "issue", "--role", "admin")):
        _one_line_exit_2(cli(cfg, *args, check=False), "gateway.data_dir", "afile")
    demo = subprocess.run(
        [sys.executable, "-m", "imaging_gateway", "demo", "--dir", str(tmp_path / "afile" / "d"),
         "--patients", "1", "--no-serve"], capture_output=True, text=True, timeout=300,
    )
    _one_line_exit_2(demo, "--dir", "afile")


def test_password_env_with_sqlite_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "g.toml"
    cfg.write_text('[index]\nurl = "sqlite:///index.sqlite3"\npassword_env = "IG_PW"\n',
                   encoding="utf-8")
    _one_line_exit_2(cli(cfg, "index", "stats", env={"IG_PW": "pw"}, check=False),
                     "index.password_env")


def test_sqlite_path_in_a_missing_folder_is_refused_not_created(tmp_path: Path) -> None:
    cfg = tmp_path / "g.toml"
    cfg.write_text('[gateway]\ndata_dir = "data"\n[index]\nurl = "sqlite:///nope/sub/i.sqlite3"\n',
                   encoding="utf-8")
    for args in (("index", "stats"), ("serve",)):
        _one_line_exit_2(cli(cfg, *args, check=False), "index.url", "nope")
    assert not (tmp_path / "nope").exists()
    # The default index under data_dir, which the gateway owns, is created.
    cfg.write_text('[gateway]\ndata_dir = "data"\n', encoding="utf-8")
    assert cli(cfg, "index", "stats").returncode == 0
    assert (tmp_path / "data" / "index.sqlite3").is_file()


def test_wrong_postgresql_role_says_authentication_not_unreachable(tmp_path: Path) -> None:
    cfg = tmp_path / "g.toml"
    cfg.write_text('[index]\nurl = "postgresql://no_such_role@127.0.0.1:5432/test"\n'
                   'password_env = "IG_PW"\n', encoding="utf-8")
    out = cli(cfg, "index", "stats", env={"IG_PW": "s3cr3t-pw"}, check=False)
    line = _one_line_exit_2(out, "index.url", "no_such_role")
    assert "authentication" in line and "unreachable" not in line
    assert "s3cr3t-pw" not in out.stderr + out.stdout
