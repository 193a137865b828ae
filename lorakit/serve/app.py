"""The OpenAI-compatible HTTP API over an :class:`Engine` (FastAPI), so the official ``openai`` client works.

    POST /v1/completions, POST /v1/chat/completions   (``"stream": true`` answers with server-sent events)
    GET  /v1/models                                   the base model and every loaded adapter
    POST /v1/adapters {name, path}, DELETE /v1/adapters/{name}
    POST /v1/load_lora_adapter {lora_name, lora_path}, POST /v1/unload_lora_adapter {lora_name}   (vLLM's)
    GET  /health                                      status, scheduler, rows in flight, KV cache bytes and cap
    GET  /metrics                                     Prometheus text format (requests, latency, TTFT, tokens)
    GET  /                                            the playground page (lorakit.serve.playground)

Request bodies over ``Limits.max_request_bytes`` get 413 before anything parses them.

``model`` in a request picks the adapter by name (the base model's name: no adapter); with an adapter root,
a name that is not loaded but is a directory in the root is loaded on first use. Every refusal is
an OpenAI-style ``{"error": {...}}`` body with a 4xx status; nothing a client sends stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import LorakitError
from ..generate.rows import Event
from ..generate.sampling import SamplingParams
from . import playground
from . import schemas as S
from .engine import Engine, ForbiddenError, NotFoundError, ServeError
from .metrics import CONTENT_TYPE
from .rows import ClientRow

REQUEST_TIMEOUT_S = 600.0  # longest wait for the next piece of a generation
router = APIRouter()


def create_app(engine: Engine, adapter_root: str | Path | None = None, *, load_on_first_use: bool = True) -> FastAPI:
    """Build the FastAPI app; starts the engine's worker, and stops it when the app shuts down.

    Args:
        engine: the engine to serve.
        adapter_root: POST /v1/adapters loads only directories inside it; None refuses runtime loading.
        load_on_first_use: a request whose ``model`` is not loaded but names a directory in ``adapter_root``
            loads it (evicting the least recently used idle adapter past max_adapters).
    """

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.close)

    app = FastAPI(title="lorakit", summary="LoRA adapters over one base model, OpenAI-compatible",
                  lifespan=lifespan)
    app.state.engine = engine
    app.state.adapter_root = Path(adapter_root).resolve() if adapter_root is not None else None
    app.state.load_on_first_use = load_on_first_use
    app.include_router(router)
    app.include_router(playground.router)
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=engine.limits.max_request_bytes)
    engine.start()
    return app


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(S.error_body(message, status, param), status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(_request: Request, exc: ServeError):
        return _error(exc.status, str(exc), exc.param)

    @app.exception_handler(LorakitError)  # e.g. a malformed adapter directory
    async def lorakit_error(_request: Request, exc: LorakitError):
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, f"the request body is not valid JSON ({errors[0].get('msg', '')})")
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        return _error(400, f"invalid field {where!r}: {first.get('msg', 'invalid value')}"
                           + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""), where)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before anything reads it whole.

    A Content-Length over the limit is answered at once, without reading the body; a chunked body is
    counted as it arrives and refused at the first chunk past the limit.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"the request body is larger than this server accepts ({self.limit} bytes, "
                                  "--max-request-bytes)")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            exc = self._too_large() if length.isdigit() else HTTPException(400, "invalid Content-Length header")
            return await _error(exc.status_code, exc.detail)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise self._too_large()  # FastAPI re-raises an HTTPException met while reading the body
            return message

        await self.app(scope, counted, send)


def _engine(request: Request) -> Engine:
    return request.app.state.engine


# ---- models and adapters ----------------------------------------------------------------------

@router.get("/health")
def health(request: Request) -> dict:
    engine = _engine(request)
    stats = engine.stats
    return {"status": "ok", "model": engine.name, "adapters": len(engine.adapters()),
            "requests": stats.requests, "batches": stats.batches, "largest_batch": stats.largest_batch,
            "scheduler": engine.limits.scheduler, "admission": engine.limits.admission,
            "rows_running": stats.running, "rows_waiting": engine.waiting(), "steps": stats.steps,
            "prefill_tokens": stats.prefill_tokens, "shared_prefix_tokens": stats.shared_prefix_tokens,
            "kv_cache": engine.kv_cache()}


@router.get("/metrics")
def metrics(request: Request) -> Response:
    return Response(_engine(request).metrics.exposition(), media_type=CONTENT_TYPE)


@router.get("/v1/models")
def models(request: Request) -> dict:
    engine = _engine(request)
    cards = [S.model_card(engine.name, engine.created)]
    cards += [S.model_card(n, created, parent=engine.name) for n, created in sorted(engine.adapters().items())]
    return {"object": "list", "data": cards}


def resolve_adapter_path(root: Path | None, path: str) -> Path:
    """The adapter directory ``path`` names, refused unless it and its files lie inside ``root``.

    Args:
        root: the resolved --adapter-root (None: runtime loading is off).
        path: relative to ``root``, or absolute inside it; no '..'; symlinks must not lead out.
    """
    if root is None:
        raise ForbiddenError("this server was started without --adapter-root, so adapters cannot be loaded "
                             "at runtime")
    raw = Path(path)
    if ".." in raw.parts:
        raise ForbiddenError(f"adapter path {path!r} contains '..'; give a directory inside the adapter root")
    resolved = (root / raw).resolve()  # follows symlinks: a link out of the root resolves outside it
    if not resolved.is_relative_to(root):
        raise ForbiddenError(f"adapter path {path!r} is outside the adapter root")
    if not resolved.is_dir():
        raise NotFoundError(f"no adapter directory {path!r} in the adapter root")
    for item in resolved.iterdir():
        if not item.resolve().is_relative_to(root):
            raise ForbiddenError(f"adapter path {path!r}: {item.name} links outside the adapter root")
    return resolved


@router.post("/v1/adapters", status_code=201)
def load_adapter(body: S.AdapterLoad, request: Request) -> dict:
    engine = _engine(request)
    path = resolve_adapter_path(request.app.state.adapter_root, body.path)
    engine.load_adapter(body.name, path)
    return S.model_card(body.name, engine.adapters()[body.name], parent=engine.name)


@router.delete("/v1/adapters/{name}")
def unload_adapter(name: str, request: Request) -> dict:
    engine = _engine(request)
    if name == engine.name:
        raise ServeError(f"{name!r} is the base model; only adapters can be unloaded")
    engine.unload_adapter(name)
    return {"id": name, "object": "model", "deleted": True}


# vLLM's runtime routes, as aliases: vLLM's bodies, its 200 plain-text answers and its status codes (a name
# already loaded is 400, not 409); lorakit's checks (paths only inside --adapter-root: 403; busy: 409).

@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
def vllm_load_adapter(body: S.LoraAdapterLoad, request: Request) -> str:
    engine, name = _engine(request), body.lora_name
    if name == engine.name or name in engine.adapters():
        hint = ("lorakit does not replace a loaded adapter in place; unload it first (POST "
                "/v1/unload_lora_adapter)" if body.load_inplace else "unload it first or pick another name")
        raise ServeError(f"The lora adapter '{name}' has already been loaded; {hint}.", "lora_name")
    path = resolve_adapter_path(request.app.state.adapter_root, body.lora_path)
    engine.load_adapter(name, path)
    return f"Success: LoRA adapter '{name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
def vllm_unload_adapter(body: S.LoraAdapterUnload, request: Request) -> str:
    unload_adapter(body.lora_name, request)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."


def _locator(request: Request):
    """Adapter name -> its directory in --adapter-root, for load on first use (None: nothing to load)."""
    root = request.app.state.adapter_root

    def locate(name: str) -> Path | None:
        if root is None or not request.app.state.load_on_first_use or name in (".", "..") or "/" in name \
                or "\\" in name:
            return None  # a name is one directory of the root, never a path
        return resolve_adapter_path(root, name) if (root / name).is_dir() else None
    return locate


# ---- generation -------------------------------------------------------------------------------

@router.post("/v1/completions")
async def completions(body: S.CompletionRequest, request: Request):
    engine = _engine(request)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    prompt_ids = [await run_in_threadpool(engine.encode, p) for p in prompts]
    max_tokens = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default for completions
    release = await run_in_threadpool(engine.hold, body.model, _locator(request))  # loads on first use
    try:
        return await _generate(engine, body, prompt_ids, max_tokens, request, chat=False)
    finally:
        release()  # the submitted rows hold the adapter now


@router.post("/v1/chat/completions")
async def chat_completions(body: S.ChatRequest, request: Request):
    engine = _engine(request)
    engine.check_chars(sum(len(m.text()) for m in body.messages))  # before templating and tokenizing
    prompt = await run_in_threadpool(_chat_prompt, engine, body.messages)
    ids = await run_in_threadpool(engine.encode, prompt, False)  # the template carries the special tokens
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:  # OpenAI's default: as much as fits
        room = (engine.context_length or 1 << 30) - len(ids)
        max_tokens = max(1, min(engine.limits.max_tokens, room))
    release = await run_in_threadpool(engine.hold, body.model, _locator(request))  # loads on first use
    try:
        return await _generate(engine, body, [ids], max_tokens, request, chat=True)
    finally:
        release()


def _chat_prompt(engine: Engine, messages: list[S.ChatMessage]) -> str:
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ServeError(f"model {engine.name!r} has no chat template; use /v1/completions")
    try:
        return tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                             tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja errors raised by the template itself, e.g. "roles must alternate"
        raise ServeError(f"the chat template rejected these messages: {exc}") from None


async def _generate(engine: Engine, body, prompt_ids: list[list[int]], max_tokens: int, request: Request,
                    chat: bool):
    """Submit the ``n`` rows of each prompt side by side (they prefill it once), then answer with one JSON
    body or an SSE stream; choice ``i`` (prompt ``i // n``, completion ``i % n``) samples with ``seed + i``."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def sink(event: Event) -> None:  # runs on the engine thread
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the server is stopping
            loop.call_soon_threadsafe(events.put_nowait, event)

    rows: list[ClientRow] = []
    try:
        for k, ids in enumerate(prompt_ids):
            params = [SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                     seed=None if body.seed is None else body.seed + k * body.n + j, stop=body.stop)
                      for j in range(body.n)]  # the n samples of a prompt differ, and as generate() draws them
            rows += engine.submit_choices(ids, body.model, params, sink, first_index=k * body.n)
    except BaseException:
        _cancel(rows)
        raise
    prompt_tokens = sum(len(p) for p in prompt_ids)
    rid = S.new_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        stream = _sse(events, rows, rid, body, prompt_tokens, chat)
        return StreamingResponse(stream, media_type="text/event-stream")
    collect, gone = asyncio.ensure_future(_collect(events, len(rows))), asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        _cancel(rows)  # done, or the client went away: the engine frees their rows at its next step
        gone.cancel()
    if not collect.done():
        collect.cancel()
        return Response(status_code=499)  # nobody reads it: the client closed the connection
    finals, texts = collect.result()
    failed = next((e for e in finals if e.error), None)
    if failed is not None:
        return _error(500, failed.error)
    choice = S.chat_choice if chat else S.completion_choice
    choices = [choice(i, texts[i], e.finish_reason) for i, e in enumerate(finals)]
    kind = "chat.completion" if chat else "text_completion"
    return S.envelope(rid, kind, body.model, choices, S.usage(finals, prompt_tokens))


def _cancel(rows: list[ClientRow]) -> None:
    for row in rows:
        row.cancelled.set()  # a no-op for finished rows; stops the others at their next token


async def _disconnect(request: Request) -> None:
    """Return when the client goes away (its body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next(events: asyncio.Queue) -> Event:
    try:
        return await asyncio.wait_for(events.get(), REQUEST_TIMEOUT_S)
    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
        raise ServeError(f"no output within {REQUEST_TIMEOUT_S:.0f} s; the server is overloaded") from None


async def _collect(events: asyncio.Queue, n: int) -> tuple[list[Event], list[str]]:
    """Wait for all ``n`` rows: their final Events and whole texts, by choice index."""
    parts: list[list[str]] = [[] for _ in range(n)]
    finals: list[Event | None] = [None] * n
    while any(f is None for f in finals):  # every row ends (max_tokens), and _next times out
        event = await _next(events)
        parts[event.index].append(event.text)
        if event.finish_reason is not None:
            finals[event.index] = event
    return finals, ["".join(p) for p in parts]


def _sse_line(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _sse(events: asyncio.Queue, rows: list[ClientRow], rid: str, body, prompt_tokens: int,
               chat: bool) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: chunks, an optional usage chunk, then ``[DONE]``."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    finals: list[Event] = []
    try:
        if chat:  # the first chunk of each choice carries the role
            choices = [S.chat_delta(i, {"role": "assistant", "content": ""}, None) for i in range(len(rows))]
            yield _sse_line(S.envelope(rid, kind, body.model, choices))
        while len(finals) < len(rows):
            event = await _next(events)
            if event.error:
                yield _sse_line(S.error_body(event.error, 500))
                return
            if event.finish_reason is not None:
                finals.append(event)
            if not event.text and event.finish_reason is None:
                continue
            if chat:
                delta = {"content": event.text} if event.text else {}
                choice = S.chat_delta(event.index, delta, event.finish_reason)
            else:
                choice = S.completion_choice(event.index, event.text, event.finish_reason)
            yield _sse_line(S.envelope(rid, kind, body.model, [choice]))
        if body.include_usage:
            yield _sse_line(S.envelope(rid, kind, body.model, [], S.usage(finals, prompt_tokens)))
        yield _sse_line("[DONE]")
    except ServeError as exc:
        yield _sse_line(S.error_body(str(exc), exc.status))
    finally:
        _cancel(rows)  # the client went away, or we are done
