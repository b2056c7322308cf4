"""The ingress's admission middleware without engines: a streamed response counts as in flight until its
last byte, and while draining new API requests get 503 + Retry-After (other routes still answer)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from deployments.admission import Admission as _Admission
from deployments.admission import AdmissionMiddleware as _AdmissionMiddleware


def _app(release: asyncio.Event) -> FastAPI:
    app = FastAPI()
    app.add_middleware(_AdmissionMiddleware)

    @app.post("/v1/completions")
    async def completions() -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            yield "data: first\n\n"
            await release.wait()
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    return app


def test_stream_counts_until_its_last_byte_and_draining_refuses_new() -> None:
    """Over a real HTTP server (httpx's ASGI transport would buffer the whole stream)."""
    import uvicorn

    from deployments.rank import free_port

    async def scenario() -> None:
        release = asyncio.Event()
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(_app(release), host="127.0.0.1", port=port, log_level="warning")
        )
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            lines: list[str] = []

            async def stream() -> None:
                async with client.stream("POST", "/v1/completions") as r:
                    async for line in r.aiter_lines():
                        if line:
                            lines.append(line)

            task = asyncio.create_task(stream())
            for _ in range(100):
                if lines:
                    break
                await asyncio.sleep(0.01)
            assert lines == ["data: first"] and _Admission.in_flight == 1  # headers sent, body not done
            _Admission.draining = True
            try:
                r = await client.post("/v1/completions")
                assert r.status_code == 503 and r.headers["retry-after"] == "5"
                assert "shutting down" in r.json()["error"]["message"]
                assert (await client.get("/health")).status_code == 200  # not an API request
                assert _Admission.in_flight == 1
                release.set()
                await asyncio.wait_for(task, 5)
                assert lines[-1] == "data: [DONE]" and _Admission.in_flight == 0
            finally:
                _Admission.draining = False
                server.should_exit = True
                await asyncio.wait_for(serving, 10)

    asyncio.run(scenario())
