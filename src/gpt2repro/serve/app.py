"""The ASGI app (Starlette): OpenAI's /v1/models, /v1/completions and /v1/chat/completions, vLLM's
/tokenize and /detokenize, Prometheus' /metrics, /health, and the web page at /. Every refusal is
OpenAI's error JSON with a 4xx status, never a traceback; with an API key set, /v1 and the tokenizer
routes answer 401 without `Authorization: Bearer KEY` (the scheme in any case). `guard` decides what
browsers may do; a request whose client disconnects stops its generation."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import protocol
from .generation import Generation, Served
from .guard import LOOPBACK_NAMES, Guard
from .metrics import CountRequests, Metrics
from .protocol import APIError

MAX_BODY = 1 << 20  # bytes: a full context of token ids is ~10 KB; more is a mistake or abuse
log = logging.getLogger("gpt2repro.serve")
# The page's files run only the page's own scripts and styles, and talk only to this server: a second
# line of defence behind the page's textContent-only rendering of model and user text.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


class JSON(JSONResponse):
    """JSON with every non-ASCII character escaped: any text a client sent can be written back."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


async def _body(request: Request) -> dict:
    """The JSON body, refused past MAX_BODY bytes before it is all read."""
    declared = request.headers.get("content-length", "")
    too_big = APIError(413, f"the request body is over {MAX_BODY} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise too_big
    raw = bytearray()
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY:
                raise too_big
    except ClientDisconnect:
        log.warning(
            "%s %s: the client disconnected before sending the whole body", request.method, request.url.path
        )
        raise APIError(
            400, "the client disconnected before sending the whole body", code="client_disconnected"
        ) from None
    return protocol.parse_json(bytes(raw))


def _authorize(request: Request) -> None:
    key = request.app.state.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        what = "no API key was given" if not scheme else "the API key is wrong"
        raise APIError(401, f"{what}: send 'Authorization: Bearer KEY'", code="invalid_api_key")


def _sse(chunks) -> StreamingResponse:
    """Server-sent events in OpenAI's format, ending with `data: [DONE]`; an error mid-stream is
    sent as an event of its own, ending the stream."""

    async def lines():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
            return
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _answer(request: Request, gen: Generation, stream, whole) -> Response:
    """The stream, or the whole response once done; a client that leaves first stops the work."""
    if gen.params.stream:
        return _sse(stream())
    work, gone = asyncio.ensure_future(gen.run()), asyncio.ensure_future(_disconnected(request))
    await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        log.info(
            "%s: the client disconnected; its %d sequence(s) stopped", request.url.path, len(gen.choices)
        )
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
    work.result()
    return JSON(whole())


async def models(request: Request) -> Response:
    _authorize(request)
    served: Served = request.app.state.served
    entry = {"id": served.model_id, "object": "model", "created": 0, "owned_by": "gpt2repro",
             "chat": served.chat is not None, "context_length": served.block_size}  # fmt: skip
    return JSON({"object": "list", "data": [entry]})


async def completions(request: Request) -> Response:
    _authorize(request)
    served: Served = request.app.state.served
    body = await _body(request)
    params = protocol.completion_params(
        body, served.model_id, served.encode, served.vocab_size, served.block_size, request.app.state.limit
    )
    gen = Generation(served, params, request.app.state.metrics)
    return await _answer(request, gen, gen.completion_chunks, gen.completion)


def _chat_prompt(body: dict, served: Served) -> list[int]:
    protocol.check_model(body, served.model_id)
    messages = protocol.chat_messages(body)
    if served.chat is None:
        raise APIError(400, f"'{served.model_id}' is a base model: it has no chat template; use /v1/completions",
                       "model", "model_not_chat")  # fmt: skip
    return served.chat.render(messages)


async def chat_completions(request: Request) -> Response:
    _authorize(request)
    served: Served = request.app.state.served
    body = await _body(request)
    prompt = _chat_prompt(body, served)
    params = protocol.sampling(
        body, [prompt], served.block_size, request.app.state.limit, None, served.vocab_size, chat=True
    )
    gen = Generation(served, params, request.app.state.metrics)
    return await _answer(request, gen, gen.chat_chunks, gen.chat_completion)


async def tokenize(request: Request) -> Response:
    """vLLM's /tokenize: a prompt's token ids (or a conversation's, rendered for a reply)."""
    _authorize(request)
    served: Served = request.app.state.served
    body = await _body(request)
    if "messages" in body:
        ids = _chat_prompt(body, served)
    else:
        protocol.check_model(body, served.model_id)
        ids = served.encode(protocol.field(body, "prompt", str, required=True))
    return JSON({"tokens": ids, "count": len(ids), "max_model_len": served.block_size})


async def detokenize(request: Request) -> Response:
    """vLLM's /detokenize: the text of token ids (chat tokens spelled out)."""
    _authorize(request)
    served: Served = request.app.state.served
    body = await _body(request)
    protocol.check_model(body, served.model_id)
    ids = protocol.field(body, "tokens", list, required=True)
    ok = all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < served.vocab_size for t in ids)
    protocol.check(ok, f"'tokens' must be an array of token ids (0..{served.vocab_size - 1})", "tokens")
    return JSON({"prompt": served.decode(ids)})


async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def health(request: Request) -> Response:
    return JSON({"status": "ok", **request.app.state.served.engine.stats()})


async def page(request: Request) -> Response:
    name = request.path_params.get("name", "index.html")
    files = resources.files("gpt2repro.serve") / "static"
    kinds = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
    kind = next((v for k, v in kinds.items() if name.endswith(k)), None)
    if kind is None or "/" in name or not (files / name).is_file():
        raise HTTPException(404)
    return Response((files / name).read_bytes(), media_type=f"{kind}; charset=utf-8", headers=PAGE_HEADERS)


async def _api_error(request: Request, exc: APIError) -> Response:
    return JSON(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {
        404: f"no route {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }
    error = APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)))
    return JSON(error.body(), status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception) -> Response:
    return JSON(APIError(500, f"internal error: {type(exc).__name__}", code="server_error").body(), 500)


def create_app(
    served: Served,
    api_key: str | None = None,
    max_tokens_limit: int | None = None,
    allowed_hosts: frozenset[str] | None = LOOPBACK_NAMES,
    cors_origins: frozenset[str] = frozenset(),
) -> Starlette:
    """The app; `allowed_hosts` are the Host names it answers (None: any), `cors_origins` the other
    origins whose pages may call it (`guard`)."""
    routes = [
        Route("/", page),
        Route("/static/{name}", page),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _server_error}
    counter = Metrics(served.engine.stats)
    known = frozenset(r.path for r in routes if "{" not in r.path)
    middleware = [Middleware(CountRequests, metrics=counter, routes=known),
                  Middleware(Guard, hosts=allowed_hosts, origins=cors_origins)]  # fmt: skip
    app = Starlette(routes=routes, exception_handlers=handlers, middleware=middleware)
    app.state.served, app.state.api_key, app.state.metrics = served, api_key, counter
    app.state.limit = max_tokens_limit or served.block_size
    return app
