"""Fan-out: deadlines, failures isolated per peer, circuit breakers, merged and tagged studies."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imaging_gateway.federation.fanout import (
    PRIVATE_CREATOR,
    CircuitBreaker,
    CircuitBreakers,
    FanOutResult,
    PeerAnswerError,
    PeerOutcome,
    fan_out,
    holding_province,
    merge_studies,
    warning_header,
    warning_texts,
)
from imaging_gateway.federation.peers import Peer

DEADLINE = 0.2
HANG_GUARD_S = 120
"""Only ends a test whose fan-out never answers (a bug); no timing is measured against it."""

_PEM = (
    Ed25519PrivateKey.generate()
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


def peer(province: str) -> Peer:
    return Peer(
        province, f"peer {province}", f"https://gw{province}.example/dicomweb", public_key_pem=_PEM
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def fast(p: Peer) -> list[str]:
    await asyncio.sleep(0)
    return [p.province]


async def slow(p: Peer) -> list[str]:
    """A stalled peer: it never answers, so only the deadline can end the fan-out."""
    await asyncio.Event().wait()
    return [p.province]


async def refused(p: Peer) -> list[str]:
    raise ConnectionRefusedError("connect to https://gw.example/dicomweb/studies?PatientID=P-1")


async def garbage(p: Peer) -> list[str]:
    raise PeerAnswerError("not a JSON array")


async def own_timeout(p: Peer) -> list[str]:
    raise TimeoutError


BEHAVIOUR = {
    "110000": fast,
    "310000": slow,
    "320000": refused,
    "440000": garbage,
    "500000": own_timeout,
}


async def by_province(p: Peer) -> list[str]:
    return await BEHAVIOUR[p.province](p)


async def test_each_peer_has_its_outcome_within_the_deadline() -> None:
    clock = FakeClock()

    async def timed(p: Peer) -> list[str]:
        if p.province == "110000":
            clock.now += 0.01  # the injected clock times each call
        return await by_province(p)

    peers = [peer(code) for code in BEHAVIOUR]
    # 310000 is stalled: the fan-out answers at all only because the deadline ends its call.
    async with asyncio.timeout(HANG_GUARD_S):
        result = await fan_out(peers, timed, deadline_s=DEADLINE, clock=clock)
    status = {o.province: (o.status, o.reason) for o in result.outcomes}
    assert status == {
        "110000": ("ok", None),
        "310000": ("timeout", None),
        "320000": ("error", "ConnectionRefusedError"),
        "440000": ("error", "not a JSON array"),
        "500000": ("timeout", None),
    }
    # Outcomes in the peers' order; the exception's message (a URL with a PatientID) is not kept.
    assert [o.province for o in result.outcomes] == list(BEHAVIOUR)
    assert "P-1" not in repr(result)
    assert result.values == {"110000": ["110000"]}
    assert [o.province for o in result.failed] == ["310000", "320000", "440000", "500000"]
    assert result.outcomes[0].elapsed_s == pytest.approx(0.01)
    assert result.elapsed_s == pytest.approx(0.01)


async def test_all_fast_answers_before_the_deadline() -> None:
    # An hour's deadline: the answer comes as soon as every peer has answered, not then.
    async with asyncio.timeout(HANG_GUARD_S):
        result = await fan_out([peer("110000"), peer("310000")], fast, deadline_s=3600)
    assert result.values == {"110000": ["110000"], "310000": ["310000"]}


async def test_a_call_that_ignores_cancellation_does_not_hold_the_answer() -> None:
    release = asyncio.Event()

    async def stubborn(p: Peer) -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release.wait()  # ignores the cancellation until the test lets it go
        return "late"

    async with asyncio.timeout(HANG_GUARD_S):
        result = await fan_out([peer("310000")], stubborn, deadline_s=DEADLINE)
    assert result.outcomes[0].status == "timeout"
    (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "federation-310000"]
    assert not task.done()  # the answer went out while the call still ran
    release.set()
    assert await task is not None  # let it finish inside this test


async def test_no_peers_and_bad_arguments() -> None:
    empty: FanOutResult[str] = await fan_out([], fast, deadline_s=DEADLINE)  # type: ignore[arg-type]
    assert empty.outcomes == ()
    with pytest.raises(ValueError, match="deadline"):
        await fan_out([peer("110000")], fast, deadline_s=0)
    with pytest.raises(ValueError, match="twice"):
        await fan_out([peer("110000"), peer("110000")], fast, deadline_s=DEADLINE)


async def test_abandoned_fan_out_cancels_its_calls() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def waits(p: Peer) -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "x"

    task = asyncio.create_task(fan_out([peer("110000")], waits, deadline_s=3600))
    async with asyncio.timeout(HANG_GUARD_S):
        await started.wait()  # the call is running, not merely scheduled
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await cancelled.wait()


def test_breaker_transitions() -> None:
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=3, cool_down_s=30, clock=clock)
    assert b.state == "closed" and b.allow()
    b.record_failure()
    b.record_failure()
    assert b.state == "closed" and b.consecutive_failures == 2
    b.record_success()  # consecutive failures only
    b.record_failure()
    b.record_failure()
    assert b.state == "closed"
    b.record_failure()
    assert b.state == "open" and not b.allow()
    clock.now += 29.9
    assert b.state == "open" and not b.allow()
    clock.now += 0.1
    assert b.state == "half-open"
    assert b.allow()  # the probe
    assert not b.allow()  # one probe at a time
    b.record_failure()  # the probe failed: open for another cool-down
    assert b.state == "open" and not b.allow()
    clock.now += 30
    assert b.allow()
    b.record_success()
    assert b.state == "closed" and b.allow() and b.consecutive_failures == 0


def test_breaker_probe_abandoned_is_retried_after_a_cool_down() -> None:
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=1, cool_down_s=10, clock=clock)
    b.record_failure()
    clock.now += 10
    assert b.allow()
    clock.now += 5
    assert not b.allow()
    clock.now += 5
    assert b.allow()


def test_breaker_arguments() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(cool_down_s=0)


async def test_fan_out_feeds_and_obeys_breakers() -> None:
    clock = FakeClock()
    breakers = CircuitBreakers(failure_threshold=2, cool_down_s=60, clock=clock)
    peers = [peer("110000"), peer("320000")]
    calls: list[str] = []

    async def counted(p: Peer) -> list[str]:
        calls.append(p.province)
        return await by_province(p)

    for _ in range(2):
        await fan_out(peers, counted, deadline_s=DEADLINE, breakers=breakers)
    assert breakers.states() == {"110000": "closed", "320000": "open"}
    calls.clear()
    result = await fan_out(peers, counted, deadline_s=DEADLINE, breakers=breakers)
    assert calls == ["110000"]
    assert result.outcomes[1] == PeerOutcome("320000", "skipped", reason="circuit open")
    assert warning_texts(result) == ("peer 320000 skipped: circuit open",)
    clock.now += 60
    BEHAVIOUR_BACK = {"320000": fast}

    async def recovered(p: Peer) -> list[str]:
        return await BEHAVIOUR_BACK.get(p.province, fast)(p)

    result = await fan_out(peers, recovered, deadline_s=DEADLINE, breakers=breakers)
    assert result.outcomes[1].status == "ok"
    assert breakers.states()["320000"] == "closed"


async def test_slow_peer_counts_as_a_failure() -> None:
    breakers = CircuitBreakers(failure_threshold=1, cool_down_s=60, clock=FakeClock())
    await fan_out([peer("310000")], slow, deadline_s=0.05, breakers=breakers)
    assert breakers.states() == {"310000": "open"}


def test_warning_header() -> None:
    result: FanOutResult[Any] = FanOutResult(
        outcomes=(
            PeerOutcome("110000", "ok", value=[]),
            PeerOutcome("440000", "timeout", elapsed_s=1.5),
            PeerOutcome("320000", "error", reason='not "JSON"'),
        ),
        elapsed_s=1.5,
    )
    texts = warning_texts(result)
    assert texts == ("peer 440000 timed out", 'peer 320000 failed: not "JSON"')
    assert warning_header(texts, agent="gw.bj.example:8443") == (
        '299 gw.bj.example:8443 "peer 440000 timed out", '
        "299 gw.bj.example:8443 \"peer 320000 failed: not 'JSON'\""
    )
    assert warning_header(texts[:1], agent="imaging-gateway 110000") == (
        '299 imaging-gateway-110000 "peer 440000 timed out"'
    )
    assert warning_header((), agent="x") is None
    # Texts quoting the request never put a raw byte of it in the header.
    assert warning_header(("parameter a\r\nb 患 50% \\",), agent="gw\x01x") == (
        '299 gw-x "parameter a%0D%0Ab %E6%82%A3 50%25 %5C"'
    )
    assert result.metadata() == [
        {"province": "110000", "status": "ok", "elapsed_ms": 0.0},
        {"province": "440000", "status": "timeout", "elapsed_ms": 1500.0},
        {"province": "320000", "status": "error", "reason": 'not "JSON"', "elapsed_ms": 0.0},
    ]


# -- merge ---------------------------------------------------------------------------

BASE = "https://gw.bj.example/dicomweb"


def study(uid: str, date: str | None = None, **extra: Any) -> dict[str, Any]:
    ds: dict[str, Any] = {
        "0020000D": {"vr": "UI", "Value": [uid]},
        "00081190": {"vr": "UR", "Value": [f"https://elsewhere.example/studies/{uid}"]},
        "00100020": {"vr": "LO", "Value": ["P-1"]},
    }
    if date is not None:
        ds["00080020"] = {"vr": "DA", "Value": [date]}
    ds.update(extra)
    return ds


def uids(merged: list[dict[str, Any]]) -> list[str]:
    return [ds["0020000D"]["Value"][0] for ds in merged]


def merge(local: list[dict[str, Any]], remote: dict[str, list[Any]], **kw: Any) -> Any:
    args: dict[str, Any] = {"home_province": "110000", "retrieve_base": BASE + "/", "limit": 100}
    args.update(kw)
    return merge_studies(local, remote, **args)


def test_merge_dedupes_local_first_then_province_order() -> None:
    local = [study("1.1", "20250101")]
    remote = {
        "440000": [study("1.1", "20250301"), study("1.2", "20250201")],
        "310000": [study("1.2", "20240101"), study("1.3", "20240601")],
    }
    m = merge(local, remote)
    # 1.2 as 310000 holds it (dated 20240101), not as 440000 does.
    assert uids(m.studies) == ["1.1", "1.3", "1.2"]
    holders = {ds["0020000D"]["Value"][0]: holding_province(ds) for ds in m.studies}
    assert holders == {"1.1": "110000", "1.2": "310000", "1.3": "310000"}
    assert m.duplicates == 2 and m.dropped == 0 and not m.more
    assert m.provinces == {"110000": 1, "310000": 2}


def test_merge_tags_province_and_retrieve_url() -> None:
    m = merge(
        [study("1.1", "20250101")],
        {"440000": [study("1.2", "20250102")]},
        province_names={"440000": "Guangdong"},
    )
    remote, local = m.studies
    assert remote["00090010"] == {"vr": "LO", "Value": [PRIVATE_CREATOR]}
    assert remote["00091010"] == {"vr": "LO", "Value": ["440000"]}
    assert remote["00091011"] == {"vr": "LO", "Value": ["Guangdong"]}
    assert remote["00081190"] == {"vr": "UR", "Value": [f"{BASE}/federation/440000/studies/1.2"]}
    assert local["00091010"] == {"vr": "LO", "Value": ["110000"]}
    assert "00091011" not in local
    # A local study keeps its own RetrieveURL.
    assert local["00081190"]["Value"] == ["https://elsewhere.example/studies/1.1"]
    assert list(remote) == sorted(remote)


def test_merge_order_and_paging_like_a_local_search() -> None:
    local = [study("1.5", "20250101"), study("1.9")]
    remote = {
        "440000": [study("1.4", "20250101"), study("1.7", "20240101"), study("1.8")],
        "310000": [study("1.6", "20250505")],
    }
    everything = uids(merge(local, remote).studies)
    assert everything == ["1.6", "1.4", "1.5", "1.7", "1.8", "1.9"]
    for offset in range(7):
        for limit in (1, 2, 4):
            m = merge(local, remote, limit=limit, offset=offset)
            assert uids(m.studies) == everything[offset : offset + limit]
            assert m.more == (offset + limit < len(everything))
    with pytest.raises(ValueError):
        merge(local, remote, limit=0)
    with pytest.raises(ValueError):
        merge(local, remote, offset=-1)


def test_merge_drops_garbage_entries() -> None:
    remote: dict[str, list[Any]] = {
        "440000": [
            "not a dataset",
            {"0020000D": {"vr": "UI", "Value": ["01.2"]}},
            {"0020000D": {"vr": "UI"}},
            {"00100020": {"vr": "LO", "Value": ["P-1"]}},
            study("1.2", "2025-01-01"),
        ]
    }
    m = merge([], remote)
    assert uids(m.studies) == ["1.2"] and m.dropped == 4
    # A malformed date sorts as undated.
    assert merge([study("1.1")], remote).studies[0]["0020000D"]["Value"] == ["1.1"]


def test_merge_refuses_home_or_bad_province() -> None:
    with pytest.raises(ValueError):
        merge([], {"110000": []})
    with pytest.raises(ValueError):
        merge([], {"440100": []})


def test_a_peer_cannot_claim_another_province() -> None:
    spoofed = study(
        "1.2",
        "20250101",
        **{
            "00090010": {"vr": "LO", "Value": [PRIVATE_CREATOR]},
            "00091010": {"vr": "LO", "Value": ["310000"]},
            "00091099": {"vr": "LO", "Value": ["x"]},
            "00090012": {"vr": "LO", "Value": [PRIVATE_CREATOR]},
            "00091210": {"vr": "LO", "Value": ["650000"]},
        },
    )
    (ds,) = merge([], {"440000": [spoofed]}).studies
    assert holding_province(ds) == "440000"
    assert ds["00091010"]["Value"] == ["440000"]
    assert "00091099" not in ds and "00090012" not in ds and "00091210" not in ds


def test_merge_keeps_another_private_creator_and_takes_the_next_block() -> None:
    ge = study(
        "1.2",
        "20250101",
        **{
            "00090010": {"vr": "LO", "Value": ["GEMS_IDEN_01"]},
            "00091001": {"vr": "LO", "Value": ["GE"]},
        },
    )
    (ds,) = merge([], {"440000": [ge]}).studies
    assert ds["00090010"]["Value"] == ["GEMS_IDEN_01"] and ds["00091001"]["Value"] == ["GE"]
    assert ds["00090011"] == {"vr": "LO", "Value": [PRIVATE_CREATOR]}
    assert ds["00091110"] == {"vr": "LO", "Value": ["440000"]}
    assert "00091010" not in ds
    assert holding_province(ds) == "440000"


def test_merge_does_not_mutate_inputs() -> None:
    original = study("1.2", "20250101")
    snapshot = {k: dict(v) for k, v in original.items()}
    merge([], {"440000": [original]})
    assert original == snapshot
