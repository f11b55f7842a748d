"""``imaging-gateway demo``: synthetic studies in a local store, indexed, served (zero set-up)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import date
from pathlib import Path

from imaging_gateway.dicom.synthetic import HOSPITALS, generate_instances
from imaging_gateway.errors import ConfigError
from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.security.tokens import TokenAuthority, load_or_create_signing_key
from imaging_gateway.settings import Settings, load_settings
from imaging_gateway.storage.factory import load_phi_codec, load_store_keys, open_gateway_store
from imaging_gateway.sync.runner import SyncRunner

log = logging.getLogger(__name__)

DEMO_CONFIG = """\
# Written by `imaging-gateway demo`: a Beijing gateway over a local-directory store.
[gateway]
province = "110000"
name = "Beijing imaging gateway (demo)"
listen = "{listen}"
data_dir = "."

[index]
url = "sqlite:///index.sqlite3"

[[stores]]
name = "demo"
kind = "fs"
path = "store"
"""


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def populate(settings: Settings, *, patients: int) -> int:
    """Write synthetic studies into the demo store (skipping keys already there)."""
    store = open_gateway_store(settings, "demo", load_store_keys(settings))
    written = 0
    try:
        existing: set[str] = set()
        page = await store.list_page(limit=1000)
        while True:
            existing.update(o.key for o in page.objects)
            if not page.is_truncated or not page.objects:
                break
            page = await store.list_page(start_after=page.objects[-1].key, limit=1000)
        for inst in generate_instances(seed=2026, patients=patients, end_date=date.today()):
            if inst.key not in existing:
                await store.write_stream(inst.key, _one(inst.data))
                written += 1
    finally:
        await store.close()
    return written


async def index_demo(settings: Settings) -> dict[str, int]:
    index = await SqlIndex.open(settings.index, phi=load_phi_codec(settings))
    store = open_gateway_store(settings, "demo", load_store_keys(settings))
    try:
        runner = SyncRunner(settings, index, store)
        await runner.start(mode="incremental", restart=False)
        await runner.run()
        return await index.stats()
    finally:
        await store.close()
        await index.close()


def make_demo_dir(directory: Path) -> Path:
    """Create the demo's folder (``--dir``); returns it absolute.

    Raises ``ConfigError`` naming ``--dir`` when it cannot be created.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("--dir", f"cannot create {directory}: {exc.strerror or exc}") from None
    return directory.absolute()


def run_demo(
    directory: Path,
    *,
    patients: int,
    listen: str,
    serve: Callable[[Settings], int] | None,
) -> int:
    """Set up (idempotently) and index the demo; then ``serve`` its settings (the CLI's
    ``serve``, handed in so the demo does not import the CLI) unless it is None."""
    make_demo_dir(directory)
    config = directory / "gateway.toml"
    if not config.exists():
        config.write_text(DEMO_CONFIG.format(listen=listen), encoding="utf-8")
    settings = load_settings(config)
    store_dir = settings.store("demo").path
    assert store_dir is not None
    store_dir.mkdir(parents=True, exist_ok=True)
    written = asyncio.run(populate(settings, patients=patients))
    stats = asyncio.run(index_demo(settings))
    authority = TokenAuthority(
        load_or_create_signing_key(settings.security.token_key_file),
        province=settings.gateway.province,
        max_ttl_s=settings.security.token_max_ttl_s,
    )
    admin = authority.issue(subject="demo-admin", role="admin", ttl_s=8 * 3600)
    # A hospital sees the studies it produced (and others under consent): the demo's
    # first hospital, as a PACS integration would.
    hospital = HOSPITALS[0].code
    pacs = authority.issue(subject="demo-pacs", role="hospital", hospital=hospital, ttl_s=8 * 3600)
    base = f"http://{settings.gateway.listen_host}:{settings.gateway.listen_port}"
    print(f"demo: {written} new synthetic instances written to {directory / 'store'}")
    print("demo: index " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    print(f"demo: config {config}; tokens valid 8 h (admin, and the PACS of {hospital}):\n")
    print(f"export TOKEN={admin}\nexport PACS_TOKEN={pacs}\n")
    print(f'try:  curl -H "Authorization: Bearer $TOKEN" {base}/admin/index/stats')
    print(f'      curl -H "Authorization: Bearer $PACS_TOKEN" "{base}/dicomweb/studies?limit=5"')
    print(
        f'      curl -H "Authorization: Bearer $PACS_TOKEN" '
        f'"{base}/dicomweb/studies?PatientName=zhang&fuzzymatching=true"'
    )
    print(f"      imaging-gateway sync --config {config} --store demo")
    print(f"      imaging-gateway index stats --config {config}")
    if serve is None:
        return 0
    return serve(settings)
