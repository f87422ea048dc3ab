"""The server's Prometheus metrics (`GET /metrics`, prometheus-client's text format), in a registry of
the app's own so that several apps in one process (tests, `bench serve`) count apart."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Requests by route and status; prompt, cached-prompt and generated tokens; the engine's queue and
    running slots (read when scraped); time to first token and between tokens, per sequence."""

    def __init__(self, engine_stats):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "gpt2repro_requests", "HTTP requests answered", ["route", "status"], registry=registry
        )
        self.prompt_tokens = Counter(
            "gpt2repro_prompt_tokens",
            "prompt tokens of finished requests, per sequence (a prompt with n=4 counts 4 times)",
            registry=registry,
        )
        self.cached_tokens = Counter(
            "gpt2repro_prompt_tokens_cached",
            "prompt tokens found in a slot's cache (prefix caching), per sequence: at most the prompt tokens",
            registry=registry,
        )
        self.generated_tokens = Counter("gpt2repro_generation_tokens", "tokens generated", registry=registry)
        self.waiting = Gauge("gpt2repro_queue_length", "sequences waiting for a slot", registry=registry)
        self.running = Gauge("gpt2repro_running_slots", "sequences being decoded", registry=registry)
        self.first_token = Histogram("gpt2repro_time_to_first_token_seconds", "from the request to a sequence's first token",
                                     buckets=LATENCY_BUCKETS, registry=registry)  # fmt: skip
        self.per_token = Histogram("gpt2repro_time_per_output_token_seconds", "between a sequence's tokens",
                                   buckets=LATENCY_BUCKETS, registry=registry)  # fmt: skip
        self.engine_stats = engine_stats

    def request(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def tokens(self, prompt: int, generated: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generated_tokens.inc(generated)

    def cached(self, tokens: int) -> None:
        self.cached_tokens.inc(tokens)

    def token(self, seconds: float, first: bool) -> None:
        (self.first_token if first else self.per_token).observe(seconds)

    def render(self) -> bytes:
        stats = self.engine_stats()
        self.waiting.set(stats["waiting"])
        self.running.set(stats["running"])
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware counting every answered request by route (unknown paths as "other") and status."""

    def __init__(self, app, metrics: Metrics, routes: frozenset[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.request(route, message["status"])
            await send(message)

        await self.app(scope, receive, counted)
