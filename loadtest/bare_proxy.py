"""The reference: the least an aiohttp proxy can do (forward the body, relay the answer).

    python loadtest/bare_proxy.py --upstream http://127.0.0.1:8001 --port 8002
"""

import argparse

import aiohttp
import uvloop
from aiohttp import web


async def forward(request: web.Request) -> web.StreamResponse:
    session: aiohttp.ClientSession = request.app["session"]
    body = await request.read()
    async with session.post(request.app["upstream"] + request.path, data=body,
                            headers={"Content-Type": "application/json"}) as upstream:
        if upstream.content_type != "text/event-stream":
            return web.Response(status=upstream.status, body=await upstream.read(),
                                content_type=upstream.content_type)
        response = web.StreamResponse(status=upstream.status)
        response.content_type = upstream.content_type
        await response.prepare(request)
        async for data in upstream.content.iter_any():
            await response.write(data)
        await response.write_eof()
        return response


async def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app["upstream"] = upstream
    app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    app.on_cleanup.append(lambda app: app["session"].close())
    app.router.add_post("/{path:.*}", forward)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(make_app(args.upstream), host="127.0.0.1", port=args.port, access_log=None,
                print=None, loop=uvloop.new_event_loop())
