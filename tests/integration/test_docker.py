"""docker/: what can be checked without a container runtime, checked against the real code.

No Docker engine runs on these machines. So: the compose file's variables against what
``load_settings`` reads, its health checks and start order, the bucket it creates against
the one ``docker/gateway.toml`` names, the build context's exclusions, and the image's
start command (ENTRYPOINT + CMD) run in this venv with the gateway service's environment,
against a real SeaweedFS S3 (in place of MinIO) and a real PostgreSQL (in place of the
compose one); only the host names of the services are replaced.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pydicom.data
import pytest
import yaml

from imaging_gateway.settings import ENV_PREFIX, load_settings
from tests.conftest import create_pg_database
from tests.support.gateway import free_port
from tests.support.postgres import drop_database
from tests.support.seaweed import SeaweedServer

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))
    return loaded


def env_example() -> dict[str, str]:
    """docker/.env.example as compose reads a .env file: NAME=value lines."""
    path = DOCKER / ".env.example"
    assert path.is_file(), "no docker/.env.example"
    pairs = [line.split("=", 1) for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:?message} and ${VAR:-default} from ``env``; $$ is a $."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env and env[name] != "":
            return env[name]
        assert op != ":?", f"${{{name}}} is required ({arg}) and .env.example does not set it"
        return arg if op == ":-" else ""
    out = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:\?|:-)([^}]*))?\}", one, value)
    return out.replace("$$", "$")


def gateway_environment() -> dict[str, str]:
    gateway = compose()["services"]["gateway"]
    env = gateway["environment"]
    assert isinstance(env, dict)
    return {k: interpolate(str(v), env_example()) for k, v in env.items()}


def test_every_gateway_variable_is_one_the_settings_read() -> None:
    env = gateway_environment()
    ours = {k for k in env if k.startswith(ENV_PREFIX)}
    assert ours, "the gateway service sets no IMAGING_GATEWAY_* variable"
    # load_settings refuses an unknown section, store or key, naming the variable.
    settings = load_settings(DOCKER / "gateway.toml", environ=env)
    host, _, port = env["IMAGING_GATEWAY_GATEWAY__LISTEN"].rpartition(":")
    assert (settings.gateway.listen_host, settings.gateway.listen_port) == (host, int(port))
    assert settings.index.url == env["IMAGING_GATEWAY_INDEX__URL"]
    assert settings.index.password == env_example()["PG_PASSWORD"]
    store = settings.store("bj-pacs")
    assert (store.access_key, store.secret_key) == (
        env_example()["MINIO_ROOT_USER"], env_example()["MINIO_ROOT_PASSWORD"])
    # Its data directory is the volume the image makes for the gateway user.
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose()["services"]["gateway"]["volumes"]}
    assert str(settings.gateway.data_dir) in mounts


def test_services_start_in_order_on_health_and_the_bucket_is_made() -> None:
    services = compose()["services"]
    for name in ("minio", "postgres", "gateway"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    depends = services["gateway"]["depends_on"]
    assert isinstance(depends, dict), "depends_on waits for nothing but the start"
    conditions = {name: d["condition"] for name, d in depends.items()}
    assert conditions.get("postgres") == "service_healthy"
    # Whatever provides the store: healthy, or an init job that completed after it was.
    store_ready = [n for n, c in conditions.items() if n.startswith("minio")]
    assert store_ready, conditions
    for name in store_ready:
        assert conditions[name] in ("service_healthy", "service_completed_successfully")
        if conditions[name] == "service_completed_successfully":
            assert services[name]["depends_on"]["minio"]["condition"] == "service_healthy"
    # Some service creates the bucket that gateway.toml's store names.
    bucket = load_settings(DOCKER / "gateway.toml", environ=gateway_environment()).store(
        "bj-pacs").bucket
    commands = " ".join(str(s.get("command", "")) for s in services.values())
    assert re.search(rf"mc mb (--ignore-existing |-p )?local/{bucket}\b", commands), commands


def test_build_context_excludes_the_venv_and_the_image_owns_its_volume() -> None:
    ignore = (REPO / ".dockerignore").read_text(encoding="utf-8").split()
    for entry in (".venv", ".git", ".cache"):
        assert entry in ignore, entry
    dockerfile = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    volume = re.search(r"^VOLUME (\S+)", dockerfile, flags=re.MULTILINE)
    assert volume is not None
    useradd = re.search(r"useradd (.*)$", dockerfile.replace("\\\n", " "), flags=re.MULTILINE)
    assert useradd is not None
    words = shlex.split(useradd.group(1))
    # The user's home is the volume and exists in the image (owned by the user), so a new
    # named volume is created with the user's ownership, not root's.
    assert "--create-home" in words or "-m" in words, words
    home = words[words.index("--home-dir") + 1] if "--home-dir" in words else None
    assert home == volume.group(1)


@pytest.fixture
async def pg_url() -> Any:
    url = await create_pg_database(migrated=False)  # the image's commands migrate it
    yield url
    await drop_database(url)


def _image_command(config: Path) -> list[str]:
    dockerfile = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    # The compose file mounts docker/gateway.toml at the path the CMD names.
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose()["services"]["gateway"]["volumes"]}
    assert mounts[cmd[-1]] == "./gateway.toml"
    assert entrypoint == ["imaging-gateway"]
    return [str(Path(sys.executable).parent / "imaging-gateway"), *cmd[:-1], str(config)]


def test_the_images_start_command_serves_and_syncs(
        tmp_path: Path, seaweedfs: SeaweedServer, pg_url: str) -> None:
    config = DOCKER / "gateway.toml"
    command = _image_command(config)
    port = free_port()
    bucket = seaweedfs.make_bucket(f"docker-{os.getpid()}-{port}")  # as minio-init does
    env = {
        **gateway_environment(),
        # Only the services' host names (and the volume's path) differ from the container.
        "IMAGING_GATEWAY_GATEWAY__LISTEN": f"127.0.0.1:{port}",
        "IMAGING_GATEWAY_GATEWAY__DATA_DIR": str(tmp_path / "var-lib-imaging-gateway"),
        "IMAGING_GATEWAY_INDEX__URL": pg_url,
        "IMAGING_GATEWAY_STORES__BJ_PACS__ENDPOINT": seaweedfs.endpoint,
        "IMAGING_GATEWAY_STORES__BJ_PACS__BUCKET": bucket,
        "BJ_PACS_ACCESS_KEY": seaweedfs.access_key,
        "BJ_PACS_SECRET_KEY": seaweedfs.secret_key,
    }
    ct = Path(pydicom.data.get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    seaweedfs._client.put_object(Bucket=bucket, Key="ct/CT_small.dcm", Body=ct.read_bytes())
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)} | env
    cli = [command[0]]

    sync = subprocess.run([*cli, "sync", "--config", str(config), "--store", "bj-pacs",
                           "--json", "--no-progress"],
                          env=run_env, capture_output=True, text=True, timeout=120)
    assert sync.returncode == 0, sync.stderr[-2000:]
    assert json.loads(sync.stdout)["status"] == "succeeded"

    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=run_env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base, log)
        token = subprocess.run([*cli, "tokens", "issue", "--config", str(config),
                                "--role", "admin"], env=run_env, capture_output=True,
                               text=True, timeout=60, check=True).stdout.strip()
        req = urllib.request.Request(f"{base}/admin/index/stats",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            stats = json.loads(r.read())
        assert stats["instances"] == 1, stats
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert (tmp_path / "var-lib-imaging-gateway" / "keys").is_dir()


def _wait_healthy(proc: subprocess.Popen[bytes], base: str, log: Path) -> None:
    """Until /healthz answers 200; a gateway that exits fails at once."""
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        try:
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass
