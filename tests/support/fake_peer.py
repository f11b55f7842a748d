"""Misbehaving peers for federation tests: one process, one HTTPS site per mode.

``python -m tests.support.fake_peer --cert C --key K --log L slow=PORT garbage=PORT
oversized=PORT``. ``slow`` is stalled: it never answers (only the caller's deadline ends the request); ``garbage``
answers 200 with a non-JSON body typed application/dicom+json; ``oversized`` streams a
JSON array far larger than any sane answer cap. Every request's path, query and
headers are appended to the log (one JSON line each) so a test can check what a peer is
sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
from pathlib import Path

from aiohttp import web


def site(mode: str, log: Path) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        with log.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"mode": mode, "path": request.path_qs,
                                 "headers": dict(request.headers)}) + "\n")
        if mode == "slow":
            await asyncio.Event().wait()  # until the process ends
        if mode == "garbage":
            return web.Response(text="<html>not json</html>", content_type="application/dicom+json")
        resp = web.StreamResponse(headers={"Content-Type": "application/dicom+json"})
        await resp.prepare(request)
        await resp.write(b"[")
        item = json.dumps({"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}).encode()
        for _ in range(20_000):  # about 1 MB
            await resp.write(item + b",")
        await resp.write(item + b"]")
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--log", required=True, type=Path)
    parser.add_argument("sites", nargs="+", help="MODE=PORT")
    args = parser.parse_args()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)
    runners = []
    for spec in args.sites:
        mode, _, port = spec.partition("=")
        runner = web.AppRunner(site(mode, args.log), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", int(port), ssl_context=ctx).start()
        runners.append(runner)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
