"""The ASGI app (Starlette): OpenAI's /v1/models, /v1/completions and /v1/chat/completions, /health,
and the web page at /. Every refusal is OpenAI's error JSON with a 4xx status, never a traceback;
with an API key set, /v1 answers 401 without `Authorization: Bearer KEY`."""

from __future__ import annotations

import hmac
import json
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import protocol
from .generation import Generation, Served
from .protocol import APIError

MAX_BODY = 1 << 20  # bytes: a full context of token ids is ~10 KB; more is a mistake or abuse


async def _body(request: Request) -> dict:
    """The JSON body, refused past MAX_BODY bytes before it is all read."""
    declared = request.headers.get("content-length", "")
    too_big = APIError(413, f"the request body is over {MAX_BODY} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise too_big
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise too_big
    return protocol.parse_json(bytes(raw))


def _authorize(request: Request) -> None:
    key = request.app.state.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        what = "no API key was given" if not given else "the API key is wrong"
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


async def models(request: Request) -> Response:
    _authorize(request)
    served: Served = request.app.state.served
    entry = {"id": served.model_id, "object": "model", "created": 0, "owned_by": "gpt2repro",
             "chat": served.chat is not None, "context_length": served.block_size}  # fmt: skip
    return JSONResponse({"object": "list", "data": [entry]})


async def completions(request: Request) -> Response:
    _authorize(request)
    served: Served = request.app.state.served
    body = await _body(request)
    params = protocol.completion_params(
        body, served.model_id, served.encode, served.vocab_size, served.block_size, request.app.state.limit
    )
    gen = Generation(served, params)
    if params.stream:
        return _sse(gen.completion_chunks())
    await gen.run()
    return JSONResponse(gen.completion())


async def chat_completions(request: Request) -> Response:
    _authorize(request)
    served: Served = request.app.state.served
    body = await _body(request)
    protocol.check_model(body, served.model_id)
    messages = protocol.chat_messages(body)
    if served.chat is None:
        raise APIError(400, f"'{served.model_id}' is a base model: it has no chat template; use /v1/completions",
                       "model", "model_not_chat")  # fmt: skip
    prompt = served.chat.render(messages)
    params = protocol.sampling(body, [prompt], served.block_size, request.app.state.limit, default_max=None)
    protocol.check(
        not body.get("logprobs"), "chat log-probabilities are not supported; use /v1/completions", "logprobs"
    )
    gen = Generation(served, params, served.chat.stop_ids)
    if params.stream:
        return _sse(gen.chat_chunks())
    await gen.run()
    return JSONResponse(gen.chat_completion())


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", **request.app.state.served.engine.stats()})


async def page(request: Request) -> Response:
    name = request.path_params.get("name", "index.html")
    files = resources.files("gpt2repro.serve") / "static"
    kinds = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
    kind = next((v for k, v in kinds.items() if name.endswith(k)), None)
    if kind is None or "/" in name or not (files / name).is_file():
        raise HTTPException(404)
    return Response((files / name).read_bytes(), media_type=f"{kind}; charset=utf-8")


async def _api_error(request: Request, exc: APIError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {
        404: f"no route {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }
    error = APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)))
    return JSONResponse(error.body(), status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception) -> Response:
    return JSONResponse(
        APIError(500, f"internal error: {type(exc).__name__}", code="server_error").body(), 500
    )


def create_app(served: Served, api_key: str | None = None, max_tokens_limit: int | None = None) -> Starlette:
    routes = [
        Route("/", page),
        Route("/static/{name}", page),
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _server_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.served, app.state.api_key = served, api_key
    app.state.limit = max_tokens_limit or served.block_size
    return app
