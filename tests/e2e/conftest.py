"""A province gateway over a synced local store of synthetic studies: in the test process
(``InProcessGateway``) unless a test needs a process of its own."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from imaging_gateway.dicom.synthetic import SyntheticInstance
from tests.conftest import fresh_index_url
from tests.factories import make_corpus
from tests.support.gateway import (
    ForkedGateway,
    GatewayProcess,
    InProcessGateway,
    free_port,
    issue_token,
    sync_through_api,
)
from tests.support.postgres import Dropper

PROVINCE_CONFIG = """
[gateway]
province = "110000"
listen = "127.0.0.1:{port}"
data_dir = "data"

[index]
url = "{index_url}"

[[stores]]
name = "bj-fs"
kind = "fs"
path = "store"
"""


@dataclass
class Province:
    gw: GatewayProcess
    corpus: list[SyntheticInstance]

    def token(self, *args: str) -> str:
        return issue_token(self.gw.config, *args)

    def bearer(self, *args: str) -> dict[str, str]:
        return {"Authorization": "Bearer " + self.token(*args)}

    def hospital(self, code: str, subject: str = "pacs") -> dict[str, str]:
        return self.bearer("--role", "hospital", "--hospital", code, "--subject", subject)

    def studies(self, *, hospital: str | None = None, national_id: str | None = None) -> set[str]:
        return {
            i.study_uid
            for i in self.corpus
            if (hospital is None or i.hospital.code == hospital)
            and (national_id is None or i.national_id == national_id)
        }

    def shared_patient(self) -> tuple[str, str, str]:
        """(national id, a hospital holding their studies, one holding none of them)."""
        codes = sorted({i.hospital.code for i in self.corpus})
        for nid in sorted({i.national_id for i in self.corpus if i.national_id}):
            own = {i.hospital.code for i in self.corpus if i.national_id == nid}
            others = [c for c in codes if c not in own]
            if others:
                return nid, sorted(own)[0], others[0]
        raise AssertionError("corpus has no patient to share")


def start_province(tmp_path: Path, index_url: str, config_text: str, *,
                   process: bool = False) -> Province:
    """Write the synthetic corpus into ``store/``, start the gateway and sync the store
    through its admin API.

    ``config_text`` is formatted with ``port`` and ``index_url``; its ``bj-fs`` store must
    be the ``store/`` directory. ``process``: an ``imaging-gateway serve`` process (for
    tests of its memory), else the same server in the test process.
    """
    corpus = make_corpus(seed=11, patients=5, studies_per_patient=3, instances_per_series=2,
                         series_per_study=2)
    for inst in corpus:
        path = tmp_path / "store" / inst.key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(inst.data)
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(config_text.format(port=port, index_url=index_url), encoding="utf-8")
    gw: GatewayProcess = (ForkedGateway(config, port) if process
                          else InProcessGateway(config, port))
    gw.start()
    try:
        sync_through_api(gw, "bj-fs")
    except BaseException:
        gw.stop()
        raise
    return Province(gw, corpus)


@pytest.fixture
def province(tmp_path: Path, index_url: str) -> Iterator[Province]:
    started = start_province(tmp_path, index_url, PROVINCE_CONFIG)
    yield started
    started.gw.stop()


@contextlib.asynccontextmanager
async def _module_province(request: pytest.FixtureRequest,
                           tmp_path_factory: pytest.TempPathFactory, sqlite_templates: Path,
                           pg_dropper: Dropper, *, process: bool) -> AsyncIterator[Province]:
    tmp = tmp_path_factory.mktemp(f"province-{request.param}")
    async with fresh_index_url(request.param, tmp, sqlite_templates, pg_dropper) as url:
        started = start_province(tmp, url, PROVINCE_CONFIG, process=process)
        try:
            yield started
        finally:
            started.gw.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
async def module_province(request: pytest.FixtureRequest,
                          tmp_path_factory: pytest.TempPathFactory, sqlite_templates: Path,
                          pg_dropper: Dropper) -> AsyncIterator[Province]:
    """One province gateway per backend for a whole module, for tests that only read and
    whose assertions hold whatever the module's other tests asked before them."""
    async with _module_province(request, tmp_path_factory, sqlite_templates, pg_dropper,
                                process=False) as started:
        yield started


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
async def module_province_process(request: pytest.FixtureRequest,
                                  tmp_path_factory: pytest.TempPathFactory,
                                  sqlite_templates: Path,
                                  pg_dropper: Dropper) -> AsyncIterator[Province]:
    """``module_province`` as an ``imaging-gateway serve`` process (its memory is measured)."""
    async with _module_province(request, tmp_path_factory, sqlite_templates, pg_dropper,
                                process=True) as started:
        yield started


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s
