"""A retrieve audited ``ok`` before its first byte that ends short of its body leaves a
follow-up audit record (how it ended, bytes sent), through the real app (index, fs store,
gate): a client that goes away mid-body, and an object that changed since it was indexed."""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient

from imaging_gateway.api.keys import TOKENS
from imaging_gateway.app import INDEX
from imaging_gateway.dicom.synthetic import SyntheticInstance
from imaging_gateway.index.schema import audit_log
from tests.factories import make_corpus
from tests.support.synced_app import synced_app


@dataclass
class World:
    client: TestClient[Any, Any]
    corpus: list[SyntheticInstance]
    store: Path

    def study(self) -> tuple[str, str, list[SyntheticInstance]]:
        """(study UID, its hospital, its instances) of the largest study."""
        by_study: dict[str, list[SyntheticInstance]] = {}
        for inst in self.corpus:
            by_study.setdefault(inst.study_uid, []).append(inst)
        uid = max(by_study, key=lambda u: sum(len(i.data) for i in by_study[u]))
        return uid, by_study[uid][0].hospital.code, by_study[uid]

    def auth(self, code: str, subject: str) -> str:
        return self.client.app[TOKENS].issue(subject=subject, role="hospital", hospital=code)

    async def records(self, subject: str) -> list[dict[str, Any]]:
        q = sa.select(audit_log).where(audit_log.c.subject == subject).order_by(audit_log.c.seq)
        async with self.client.app[INDEX].engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(q)).mappings()]

    async def settled(self, subject: str, count: int) -> list[dict[str, Any]]:
        """The caller's records once there are ``count`` (the follow-up is written after
        the response has ended), polled: no wall-clock bound on the gateway itself."""
        for _ in range(500):
            rows = await self.records(subject)
            if len(rows) >= count:
                return rows
            await asyncio.sleep(0.02)
        return await self.records(subject)


@functools.cache
def _corpus() -> tuple[SyntheticInstance, ...]:
    # Realistic pixels (512 x 512 CT slices): a study of several MB, more than the
    # sockets buffer, so a client that stops reading leaves the body unsent.
    return tuple(make_corpus(seed=7, patients=1, studies_per_patient=1, modalities=("CT",),
                             pixel_mode="realistic", series_per_study=1,
                             instances_per_series=16))


@pytest.fixture
async def world(tmp_path: Path, index_url: str) -> AsyncIterator[World]:
    corpus = list(_corpus())
    async with synced_app(tmp_path, index_url, corpus) as client:
        yield World(client, corpus, tmp_path / "store")


async def test_a_client_gone_mid_body_leaves_a_follow_up_record(world: World) -> None:
    study, hospital, instances = world.study()
    total = sum(len(i.data) for i in instances)
    assert total > 4 * 2**20
    # First the whole body: one record, no follow-up.
    whole = world.auth(hospital, "whole-client")
    async with world.client.get(f"/dicomweb/studies/{study}",
                                headers={"Authorization": f"Bearer {whole}"}) as r:
        assert r.status == 200
        assert len(await r.read()) > total
    rows = await world.records("whole-client")
    assert [(r["action"], r["outcome"]) for r in rows] == [("retrieve", "ok")]
    token = world.auth(hospital, "gone-client")
    loop = asyncio.get_running_loop()
    client = socket.socket()
    # A small receive window, 64 KiB read, then a reset (closing with unread data): the
    # gateway's next write fails, as when a viewer is closed mid-study.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    server = world.client.server
    await loop.sock_connect(client, (server.host, server.port))
    request = (f"GET /dicomweb/studies/{study} HTTP/1.1\r\nHost: t\r\n"
               f"Authorization: Bearer {token}\r\n\r\n")
    await loop.sock_sendall(client, request.encode())
    got = 0
    while got < 65536:
        got += len(await loop.sock_recv(client, 65536))
    await asyncio.sleep(0.2)  # more arrives unread: closing now resets the connection
    client.close()
    rows = await world.settled("gone-client", 2)
    assert [(r["action"], r["outcome"]) for r in rows] == [("retrieve", "ok"),
                                                           ("retrieve", "error")]
    first, follow_up = rows
    assert first["detail"] == f"instances={len(instances)}"
    assert follow_up["StudyInstanceUID"] == study
    assert follow_up["patient_token"] == first["patient_token"] is not None
    assert follow_up["hospital"] == hospital
    ended, sent = follow_up["detail"].split()
    assert ended == "ended=client-gone"
    assert 0 < int(sent.removeprefix("bytes=")) < total


async def test_an_object_changed_mid_body_leaves_a_follow_up_record(world: World) -> None:
    study, hospital, instances = world.study()
    # The last instance is overwritten after it was indexed: the body is cut there
    # (never another object's bytes), after the first parts went out.
    last = sorted(instances, key=lambda i: i.key)[-1]
    (world.store / last.key).write_bytes(last.data[:-16] + b"\0" * 16)
    token = world.auth(hospital, "changed-client")
    async with world.client.get(f"/dicomweb/studies/{study}",
                                headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200
        with pytest.raises(Exception):  # noqa: B017 - a cut body: aiohttp's payload error
            await r.read()
    rows = await world.settled("changed-client", 2)
    assert [(r["action"], r["outcome"]) for r in rows] == [("retrieve", "ok"),
                                                           ("retrieve", "error")]
    assert rows[1]["detail"].startswith("ended=aborted bytes=")
