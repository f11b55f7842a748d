"""``imaging-gateway demo --federation``: three provinces as three gateway processes, federated.

Beijing (110000), Shanghai (310000) and Guangdong (440000) each get their own directory,
config, local-directory store (the synthetic studies of that province's hospitals), index
and signing key; one shared patient-token key; each registered with the others. They
serve plain HTTP on loopback (``federation.allow_plain_http``: a zero-set-up demo; real
deployments use ``[tls]`` and mTLS). The demo then shows a patient scanned in another
province found and opened from Beijing: a consent grant at home, a federated search, the
remote study's metadata streamed through the home gateway.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import serialization

from imaging_gateway.crypto.keyfiles import load_or_create_secret
from imaging_gateway.dicom.synthetic import SyntheticInstance, generate_instances
from imaging_gateway.errors import ConfigError, GatewayError
from imaging_gateway.federation.fanout import holding_province
from imaging_gateway.security.tokens import TokenAuthority, load_or_create_signing_key
from imaging_gateway.settings import load_settings

PROVINCES = {
    "110000": "Beijing imaging gateway (demo)",
    "310000": "Shanghai imaging gateway (demo)",
    "440000": "Guangdong imaging gateway (demo)",
}
HOME = "110000"

CONFIG = """\
# Written by `imaging-gateway demo --federation`: one of three federated demo provinces.
[gateway]
province = "{province}"
name = "{name}"
listen = "{host}:{port}"
data_dir = "."

[index]
url = "sqlite:///index.sqlite3"

[security]
# The same key file content in every province: peers match on the keyed patient token.
patient_token_key_file = "../patient-token.key"

[[stores]]
name = "demo"
kind = "fs"
path = "store"

[federation]
enabled = true
deadline_ms = 1500
# Loopback demo only: real peers are called over TLS with mTLS.
allow_plain_http = true
{peers}"""

PEER = """
[[federation.peers]]
province = "{province}"
name = "{name}"
base_url = "http://{host}:{port}/dicomweb"
kind = "gateway"
public_key_file = "../{province}/federation-public.pem"
"""


@dataclass(frozen=True, slots=True)
class DemoProvince:
    province: str
    directory: Path
    config: Path
    base: str


def set_up(
    directory: Path, *, patients: int, host: str, port: int,
    instances_per_series: int | None = None,
) -> tuple[list[DemoProvince], SyntheticInstance, str]:
    """Write the three provinces' configs, keys and stores, and index them (idempotent).

    Ports are ``port``, ``port + 1`` and ``port + 2``; ``instances_per_series`` as
    ``generate_instances`` takes it (its modality defaults when None). Returns the
    provinces (home first) and a patient's home instance with another province holding
    a study of theirs.
    Raises ``ConfigError`` from the settings of a config that was edited wrongly, and
    ``RuntimeError`` when no patient has studies in two provinces.
    """
    from imaging_gateway.demo import index_demo, make_demo_dir

    directory = make_demo_dir(directory)
    load_or_create_secret(
        directory / "patient-token.key", setting="security.patient_token_key_file"
    )
    ports = {p: port + n for n, p in enumerate(PROVINCES)}
    out: list[DemoProvince] = []
    configs: dict[str, Path] = {}
    for province, name in PROVINCES.items():
        d = directory / province
        d.mkdir(exist_ok=True)
        peers = "".join(
            PEER.format(province=p, name=n, host=host, port=ports[p])
            for p, n in PROVINCES.items()
            if p != province
        )
        config = configs[province] = d / "gateway.toml"
        config.write_text(
            CONFIG.format(province=province, name=name, host=host, port=ports[province],
                          peers=peers),
            encoding="utf-8",
        )
        # The signing key where the province's settings look for it; its public half
        # where the peers' configs name it.
        key = load_or_create_signing_key(
            load_settings(config).federation.signing_key_file,
            setting="federation.signing_key_file",
        )
        (d / "federation-public.pem").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    instances = list(generate_instances(
        seed=2026, patients=patients, studies_per_patient=3,
        instances_per_series=instances_per_series,
    ))
    for province in PROVINCES:
        d = directory / province
        config = configs[province]
        store = d / "store"
        for inst in instances:
            if inst.hospital.province == province:
                path = store / inst.key
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(inst.data)
        asyncio.run(index_demo(load_settings(config)))
        out.append(DemoProvince(province, d, config, f"http://{host}:{ports[province]}"))
    inst, other = _cross_province_patient(instances)
    return out, inst, other


async def _request(
    http: aiohttp.ClientSession, url: str, token: str, *, body: dict[str, Any] | None = None
) -> tuple[int, Any, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"}
    method = "GET" if body is None else "POST"
    async with http.request(method, url, json=body, headers=headers) as r:
        raw = await r.read()
        data = json.loads(raw) if raw and r.content_type.endswith("json") else None
        return r.status, data, dict(r.headers)


async def _wait(
    http: aiohttp.ClientSession, base: str, proc: subprocess.Popen[bytes], log: Path,
    within_s: float = 60.0,
) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise GatewayError(f"the demo gateway at {base} exited ({proc.returncode}); "
                               f"see {log}")
        try:
            async with http.get(f"{base}/healthz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise GatewayError(f"the demo gateway at {base} did not come up; see {log}")


def _cross_province_patient(
    instances: list[SyntheticInstance],
) -> tuple[SyntheticInstance, str]:
    """A patient with a study at home and one elsewhere: (home instance, other province)."""
    by_nid: dict[str, dict[str, SyntheticInstance]] = {}
    for inst in instances:
        by_nid.setdefault(inst.national_id, {}).setdefault(inst.hospital.province, inst)
    for found in by_nid.values():
        if HOME in found and len(found) > 1:
            other = sorted(p for p in found if p != HOME)[0]
            return found[HOME], other
    raise RuntimeError("no patient of the demo has studies in two provinces; use more --patients")


def run_federation_demo(directory: Path, *, patients: int, listen: str, serve: bool) -> int:
    """Set up and start three provinces; show a cross-province search and retrieve.

    Serves until interrupted (SIGINT or SIGTERM) unless ``serve`` is False (then the
    processes stop after the showcase); either way the three gateway processes are
    stopped before this returns. Returns the exit status. Raises ``ConfigError`` naming
    ``--listen`` when one of its three ports is taken, ``GatewayError`` when a gateway
    exits before it answers.
    """
    host, _, port_s = listen.rpartition(":")
    host = host or "127.0.0.1"
    _check_ports_free(host, int(port_s))
    procs: list[subprocess.Popen[bytes]] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def stop(signum: int, _frame: object) -> None:
        # Unwind through the finally below, which stops the three gateways (they are
        # our children: a SIGTERM to this process alone would leave them serving).
        raise SystemExit(128 + signum)

    for sig in previous:
        signal.signal(sig, stop)
    try:
        provinces, inst, other = set_up(
            directory, patients=patients, host=host, port=int(port_s)
        )
        for p in provinces:
            with (p.directory / "gateway.log").open("wb") as log:
                # Our own interpreter and module with a path we wrote: no untrusted input.
                procs.append(subprocess.Popen(  # noqa: S603
                    [sys.executable, "-m", "imaging_gateway", "serve", "--config", str(p.config)],
                    stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
                ))
        found = asyncio.run(_showcase(provinces, procs, inst, other))
        if not serve:
            return 0 if found else 1
        print("demo: serving; Ctrl-C (or SIGTERM) stops all three", flush=True)
        for proc in procs:
            proc.wait()
        return 0
    finally:
        for sig in previous:  # a second signal must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        _stop_all(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every gateway still running, then wait for each (SIGKILL after 10 s)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _check_ports_free(host: str, port: int) -> None:
    """Raise ``ConfigError`` naming ``--listen`` when ``port`` .. ``port + 2`` is taken."""
    for p in range(port, port + len(PROVINCES)):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            try:
                s.bind((host.strip("[]"), p))
            except OSError as exc:
                cause = "is already in use" if exc.errno == errno.EADDRINUSE else (
                    f"cannot be listened on: {exc.strerror}")
                raise ConfigError(
                    "--listen",
                    f"{host}:{p} {cause} (the federation demo listens on --listen's port "
                    "and the next two)",
                ) from None


async def _showcase(
    provinces: list[DemoProvince],
    procs: list[subprocess.Popen[bytes]],
    inst: SyntheticInstance,
    other: str,
) -> bool:
    """Consent at home, federated search, open a remote study; True if one was opened."""
    home = provinces[0]
    settings = load_settings(home.config)
    authority = TokenAuthority(
        load_or_create_signing_key(settings.security.token_key_file),
        province=HOME,
        max_ttl_s=settings.security.token_max_ttl_s,
    )
    hospital = inst.hospital.code
    pacs = authority.issue(
        subject="demo-radiologist", role="hospital", hospital=hospital, ttl_s=8 * 3600
    )
    async with aiohttp.ClientSession() as http:
        for p, proc in zip(provinces, procs, strict=True):
            await _wait(http, p.base, proc, p.directory / "gateway.log")
        until = (datetime.now(UTC) + timedelta(days=1)).isoformat()
        status, grant, _ = await _request(http, f"{home.base}/consents", pacs, body={
            "national_id": inst.national_id, "purpose": "treatment",
            "evidence": "demo: patient authorized on site", "valid_until": until})
        print(f"demo: three provinces serving: {', '.join(p.base for p in provinces)}")
        print(f"demo: consent {grant['id'] if grant else '-'} (HTTP {status}) for a patient of "
              f"{hospital}, who also has studies in {other}")
        query = (f"{home.base}/dicomweb/studies?PatientID={inst.patient_id}"
                 f"&IssuerOfPatientID={hospital}&federated=true")
        status, studies, headers = await _request(http, query, pacs)
        if "Warning" in headers:
            print(f"demo: Warning: {headers['Warning']}")
        remote_url = None
        for s in studies or []:
            holder = holding_province(s) or "?"
            uid = s["0020000D"]["Value"][0]
            date = s.get("00080020", {}).get("Value", ["?"])[0]
            print(f"demo:   study {uid} of {date} held by {holder}")
            if holder != HOME and remote_url is None:
                remote_url = s["00081190"]["Value"][0]
        if remote_url is not None:
            status, metadata, _ = await _request(http, f"{remote_url}/metadata", pacs)
            print(f"demo: opened {remote_url} through Beijing: HTTP {status}, "
                  f"{len(metadata or [])} instances")
    print(f"\nexport PACS_TOKEN={pacs}")
    print(f'try:  curl -H "Authorization: Bearer $PACS_TOKEN" "{query}"')
    if remote_url is not None:
        print(f'      curl -H "Authorization: Bearer $PACS_TOKEN" "{remote_url}/metadata"')
    return remote_url is not None


__all__ = ["PROVINCES", "DemoProvince", "run_federation_demo", "set_up"]
