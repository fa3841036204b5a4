"""The Resonate server protocol over real HTTP, for the CAPSULE_RESONATE_URL path.

No Resonate server (a Go program) comes from the package registries this
project may use, so the tests serve its protocol themselves: requests are
JSON envelopes POSTed to `/`, and push messages stream from
`GET /poll/{group}/{pid}` as server-sent events. The envelopes are answered
by resonate-sdk's own server state machine (LocalConnection's ServerState,
here through JournaledLocalConnection, which adds the promise search a
server does and journals to a SQLite file the test reads afterwards). The
kernel under test talks to it only through the SDK's HttpConnection and
SSEConnection, as it would to a real server.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from pathlib import Path

from aiohttp import web
from resonate.connections.local import unwrap_request_envelope


class ResonateProtocolServer:
    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.requests: list[str] = []  # envelopes received, for assertions
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, name="resonate-protocol-server", daemon=True)

    def __enter__(self) -> ResonateProtocolServer:
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("the Resonate protocol server did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(30)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        from capsule_kernel.kernel.checkpoint.promises import JournaledLocalConnection

        self._stopping = asyncio.Event()
        backend = JournaledLocalConnection(self.db_path, pid="server", group="server")

        async def envelope(request: web.Request) -> web.Response:
            body = await request.text()
            self.requests.append(body)
            return web.Response(text=await backend.send(body), content_type="application/json")

        async def poll(request: web.Request) -> web.StreamResponse:
            stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await stream.prepare(request)
            await stream.write(b": connected\n\n")
            await self._stopping.wait()  # nothing to push: Capsule only creates and settles promises
            return stream

        app = web.Application()
        app.router.add_post("/", envelope)
        app.router.add_get("/poll/{group}/{pid}", poll)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._ready.set()
        await self._stopping.wait()
        await runner.cleanup()
        backend.close()

    def kinds(self) -> list[str | None]:
        """The request kinds received so far (promise.create, promise.settle, ...)."""
        return [unwrap_request_envelope(json.loads(body)).get("kind") for body in list(self.requests)]
