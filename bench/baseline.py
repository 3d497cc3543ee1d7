"""The bare aiohttp baseline: same server stack as the proxy (aiohttp on uvloop, no access log), no work at all.

`POST /_body/{name}` stores a body; `POST /b/{name}` reads the request body and answers the stored bytes. The
bench stores the proxy's own answer to each scenario's request, so the baseline sends the same number of bytes.

    python -m bench.baseline --port 9100
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

BODIES = web.AppKey("bodies", dict)


async def _store(request: web.Request) -> web.Response:
    request.app[BODIES][request.match_info["name"]] = await request.read()
    return web.Response(body=b"{}", content_type="application/json")


async def _serve(request: web.Request) -> web.Response:
    await request.read()
    body = request.app[BODIES].get(request.match_info["name"])
    if body is None:
        return web.Response(status=404, body=b"{}", content_type="application/json")
    return web.Response(body=body, content_type="application/json")


def create_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[BODIES] = {}
    app.router.add_post("/_body/{name}", _store)
    app.router.add_post("/b/{name}", _serve)
    return app


async def _main(port: int) -> None:
    runner = web.AppRunner(create_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"baseline listening on 127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()  # until SIGTERM


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.baseline")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    import uvloop  # the proxy runs on uvloop too

    uvloop.run(_main(args.port))


if __name__ == "__main__":
    main()
