"""The gateway's app in aiohttp's test client, over a local store of given instances, synced."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from imaging_gateway.app import INDEX, STORES, create_app
from imaging_gateway.dicom.synthetic import SyntheticInstance
from imaging_gateway.settings import load_settings
from imaging_gateway.sync.runner import SyncRunner


@contextlib.asynccontextmanager
async def synced_app(folder: Path, index_url: str,
                     corpus: Iterable[SyntheticInstance]) -> AsyncIterator[TestClient[Any, Any]]:
    """Write ``corpus`` into ``folder/store`` (store ``bj``), build the app on ``index_url``
    and index the store with a sync job; yields the app's test client."""
    for inst in corpus:
        path = folder / "store" / inst.key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(inst.data)
    cfg = folder / "gateway.toml"
    cfg.write_text(f"""
[gateway]
data_dir = "data"
[index]
url = "{index_url}"
[[stores]]
name = "bj"
kind = "fs"
path = "store"
""", encoding="utf-8")
    settings = load_settings(cfg, environ={})
    app = create_app(settings)
    async with TestClient(TestServer(app)) as client:
        runner = SyncRunner(settings, app[INDEX], app[STORES]["bj"])
        await runner.start()
        assert (await runner.run()).status == "succeeded"
        yield client
