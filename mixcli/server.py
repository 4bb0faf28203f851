"""`mixcli serve`'s HTTP side: an OpenAI-compatible API on starlette, served by uvicorn.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health. Request
handlers check the body (mixcli/openai_api.py), hand a Job to the engine thread
(mixcli/engine.py) and relay its responses: one JSON object, or server-sent events ending in
``data: [DONE]``. Every error is OpenAI's JSON error object with its status, never a traceback.
A client that disconnects cancels its sequence at the engine's next step. SIGTERM / Ctrl-C: the
listener closes, running streams end with finish_reason "length", the process exits 0.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import signal
import sys
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import Engine, Job, QueueFull, ShuttingDown
from .openai_api import MAX_BODY_BYTES, ApiError, TextRequest, chunk, full_response, new_id, now, parse_request, usage
from .sampling import SamplerConfig, make_sampler

RETRY_AFTER_S = 1  # told to clients when the queue is full


class ClientGone(Exception):
    """The client disconnected while its answer was being generated (the job is cancelled)."""


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class ServerState:
    """What the handlers share: the engine, the model's text side, names and settings."""

    def __init__(self, engine: Engine, model, names: tuple[str, ...], defaults: SamplerConfig, api_key: str | None):
        self.engine = engine
        self.model = model
        self.names = names
        self.defaults = defaults
        self.api_key = api_key
        self.created = now()


def make_app(state: ServerState) -> Starlette:
    async def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), state.api_key.encode()):
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    async def read_json(request: Request):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise ApiError(
                413, f"the request body is {int(size)} bytes, the limit is {MAX_BODY_BYTES}", code="request_too_large"
            )
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > MAX_BODY_BYTES:
                raise ApiError(
                    413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes", code="request_too_large"
                )
        try:
            return json.loads(bytes(data))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", **state.engine.status()})

    async def models(request: Request) -> Response:
        await check_key(request)
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": state.names[0], "object": "model", "created": state.created, "owned_by": "mixcli"}],
            }
        )

    async def chat(request: Request) -> Response:
        return await complete(request, "chat")

    async def completions(request: Request) -> Response:
        return await complete(request, "completion")

    async def complete(request: Request, kind: str) -> Response:
        await check_key(request)
        body = await read_json(request)
        # tokenizing a long prompt takes a while: off the event loop, so other streams keep flowing
        req = await run_in_threadpool(
            parse_request, kind, body, state.model, state.names, state.defaults, state.engine.ctx
        )
        try:
            sampler = make_sampler(req.sampling)
        except Exception as exc:
            raise ApiError(400, str(exc)) from None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(item) -> None:  # engine thread -> this request's queue
            loop.call_soon_threadsafe(queue.put_nowait, item)

        job = Job(req.prompt, sampler, req.max_tokens, req.stop, emit, ignore_eos=req.ignore_eos)
        try:
            state.engine.submit(job)
        except QueueFull:
            raise ApiError(
                503,
                "the server is busy: too many requests are waiting; retry shortly",
                code="server_busy",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", code="shutting_down") from None
        if req.stream:
            return StreamingResponse(
                stream_events(request, req, job, queue),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await whole(request, req, job, queue)

    async def next_item(request: Request, job: Job, queue: asyncio.Queue):
        """The engine's next response for ``job``; cancels it when the client has gone."""
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), 0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    state.engine.cancel(job)
                    raise ClientGone() from None
                continue
            if isinstance(item, ShuttingDown):
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if isinstance(item, BaseException):
                raise ApiError(500, f"generation failed: {type(item).__name__}: {item}", code="internal_error")
            return item

    async def whole(request: Request, req: TextRequest, job: Job, queue: asyncio.Queue) -> Response:
        parts = []
        try:
            while True:
                resp = await next_item(request, job, queue)
                parts.append(resp.text)
                if resp.finish_reason is not None:
                    break
        except ClientGone:
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        finally:
            state.engine.cancel(job)  # a no-op once finished
        st = resp.stats
        return JSONResponse(
            full_response(
                req,
                new_id(req.kind),
                now(),
                "".join(parts),
                _finish(resp.finish_reason),
                st.prompt_tokens,
                st.completion_tokens,
            )
        )

    async def stream_events(request: Request, req: TextRequest, job: Job, queue: asyncio.Queue) -> AsyncIterator[str]:
        rid, created = new_id(req.kind), now()

        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        try:
            if req.kind == "chat":
                yield sse(chunk(req, rid, created, None, None, first=True))
            while True:
                try:
                    resp = await next_item(request, job, queue)
                except ApiError as err:  # the status line is sent: the error goes in the stream
                    yield sse(err.body())
                    return
                except ClientGone:
                    return
                if resp.finish_reason is None:
                    if resp.text:
                        yield sse(chunk(req, rid, created, resp.text, None))
                    continue
                if resp.text:
                    yield sse(chunk(req, rid, created, resp.text, None))
                yield sse(chunk(req, rid, created, None, _finish(resp.finish_reason)))
                if req.include_usage:
                    st = resp.stats
                    yield sse(
                        chunk(req, rid, created, None, None, usage_obj=usage(st.prompt_tokens, st.completion_tokens))
                    )
                yield "data: [DONE]\n\n"
                return
        finally:  # normal end, disconnect (cancelled / closed generator) or error alike
            state.engine.cancel(job)

    async def on_api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            err = ApiError(404, f"no route {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            err = ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        else:
            err = ApiError(exc.status_code, str(exc.detail))
        return error_response(err)

    async def on_error(request: Request, exc: Exception) -> Response:
        print(f"mixcli serve: internal error on {request.url.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return error_response(ApiError(500, "internal server error", code="internal_error"))

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    return Starlette(
        routes=routes, exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, Exception: on_error}
    )


def _finish(reason: str | None) -> str:
    """OpenAI's finish reasons: a cut or cancelled sequence reads as "length" (truncated)."""
    return "stop" if reason == "stop" else "length"


def bind(host: str, port: int):
    """The listening socket, bound here so that a taken port is one clear error, not uvicorn's exit."""
    import socket

    from .errors import UsageError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host!r} is not an address this machine can listen on ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}", "pick another --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(state: ServerState, sock) -> int:
    """Serve on the bound ``sock`` until SIGTERM / Ctrl-C; 0 after a clean shutdown."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # uvicorn's, minus re-raising the signal afterwards
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True
            state.engine.shutdown()

    config = uvicorn.Config(
        make_app(state),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="off",
        server_header=False,
    )
    server = Server(config)
    state.engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        state.engine.shutdown(timeout=5)
    return 0
