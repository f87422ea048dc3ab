"""What a browser may make the server do, decided in one place (an ASGI middleware before the app).

A web page the user visits can send requests to a server on their machine. Three checks keep it
from using a key-less server: the `Host` header must name this server (the bound address, the
loopback names for a loopback address, or `--allowed-host` names; DNS rebinding sends the attacker's
name), a request from another origin (an `Origin` header that is not this server's) is refused
unless that origin was allowed with `--cors-origin`, and a POST body must be `application/json`
(a page can send `text/plain` without asking first; JSON needs a CORS preflight). Allowed origins
get CORS headers, their preflights a 204; every refusal is OpenAI's error JSON."""

from __future__ import annotations

import ipaddress
import json

from starlette.datastructures import Headers

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"", "0.0.0.0", "::"})
PREFLIGHT_HEADERS = "Authorization, Content-Type"


def hostname(host: str) -> str:
    """The name in a Host header or an origin's netloc, without port, brackets or trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0].rstrip(".") if host.count(":") == 1 else host.rstrip(".")


def allowed_hosts(bound: str, extra: list[str] | None = None) -> frozenset[str] | None:
    """The Host names a server bound to `bound` answers (None: any). A loopback address answers its
    loopback names; a wildcard address (every interface) any name unless `extra` lists them; `*` in
    `extra` allows any."""
    extra = [hostname(h) if h != "*" else h for h in extra or []]
    if "*" in extra:
        return None
    name = hostname(bound)
    if name in WILDCARDS:
        return frozenset(extra) | LOOPBACK_NAMES if extra else None
    try:
        loopback = name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        loopback = False
    return frozenset({name, *extra}) | (LOOPBACK_NAMES if loopback else frozenset())


def _error(status: int, message: str, code: str) -> tuple[int, bytes]:
    kind = "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return status, json.dumps(body).encode()  # ASCII: any header text is escaped


class Guard:
    """The ASGI middleware: Host, Origin and Content-Type checks, and CORS for allowed origins."""

    def __init__(self, app, hosts: frozenset[str] | None, origins: frozenset[str] = frozenset()):
        self.app, self.hosts = app, hosts
        self.origins = frozenset(o.rstrip("/").lower() for o in origins)

    def refusal(self, scope) -> tuple[int, bytes] | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self.hosts is not None and hostname(host) not in self.hosts:
            return _error(
                403, f"this server does not answer to the host {host!r} (see --allowed-host)", "invalid_host"
            )
        origin = headers.get("origin")
        if origin is not None and not self._same_origin(origin, host) and origin.lower() not in self.origins:
            return _error(
                403, f"requests from the origin {origin!r} are not allowed (see --cors-origin)", "cors"
            )
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return _error(415, f"the body must be sent as application/json, not {kind or 'no type'}",
                              "unsupported_media_type")  # fmt: skip
        return None

    @staticmethod
    def _same_origin(origin: str, host: str) -> bool:
        return origin.lower().split("://", 1)[-1] == host.strip().lower()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self.refusal(scope)
        origin = Headers(scope=scope).get("origin")
        cors = [] if origin is None or origin.lower() not in self.origins else [
            (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]  # fmt: skip
        if refused is None and cors and scope["method"] == "OPTIONS":
            allow = [(b"access-control-allow-methods", b"GET, POST"),
                     (b"access-control-allow-headers", PREFLIGHT_HEADERS.encode()), (b"access-control-max-age", b"600")]  # fmt: skip
            return await _respond(send, 204, b"", cors + allow)
        if refused is not None:
            return await _respond(send, *refused, cors)

        async def send_with_cors(message):
            if message["type"] == "http.response.start" and cors:
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        await self.app(scope, receive, send_with_cors)


async def _respond(send, status: int, body: bytes, headers: list) -> None:
    kind = [(b"content-type", b"application/json")] if body else []
    length = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*kind, *length, *headers]})
    await send({"type": "http.response.body", "body": body})
