"""The batched generation engine behind `gpt2repro serve`: one thread owns the model and a KV cache
with a slot per running sequence; each step it admits waiting jobs into free slots (prefilling each
alone), then decodes one token for every running sequence in a single forward pass.

Running sequences always fill slots 0..m-1 (a finished one's slot trades places with the last
one's), so a step computes exactly the running rows. Every job draws with `sampling.draw` and its own
seeded generator from its own row's logits, so it draws what it would draw alone; only the batched
matmuls may round differently from one-row ones (last-bit differences in the logits; greedy picks
agree on the test model). A job ends at `sampling.ends_reply`, like every other entry point.

Fairness: jobs wait per request, and free slots go round-robin between requests, so a request of
many sequences cannot hold back one that came later for longer than one sequence takes.
Prefix caching: a free slot keeps the tokens of the sequence that last used it; a new job starts in
the slot whose cached tokens share the longest prefix with its prompt and runs only the rest (a
multi-turn client re-sends the whole conversation each turn). The cache is allocated once."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generation.decoding import Decoder
from ..generation.sampling import Sampling, draw, ends_reply
from ..model.gpt import GPT
from ..model.kvcache import KVCache


@dataclass
class TokenInfo:
    """One token of a sequence and, when asked for, the model's log-probabilities at its position."""

    id: int
    logprob: float | None = None  # None for the first prompt token (nothing predicts it)
    top: list[tuple[int, float]] | None = None  # the most likely tokens there, most likely first


@dataclass
class Job:
    """One sequence to generate. `emit` is called from the engine's thread with ("prompt", [TokenInfo]),
    ("start", prompt tokens found cached), ("token", TokenInfo), then ("done", "stop" | "length") or
    ("error", message); setting `cancelled` (a client gone, a stop string seen) frees its slot at the
    next step. Jobs of one `group` (a request) take turns with other groups for free slots."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[tuple], None]
    sampling: Sampling = Sampling()
    group: object = None
    logprobs: int | None = None  # top-N alternatives per generated token; None: no log-probabilities
    echo_logprobs: bool = False  # log-probabilities of the prompt's tokens too
    cancelled: bool = False
    finish: str | None = None  # "stop" once a token that ends a reply is drawn
    drawn: list[int] = field(default_factory=list)  # the tokens generated so far (what penalties count)
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def generated(self) -> int:
        return len(self.drawn)


def _infos(logits: torch.Tensor, ids: list[int], top: int) -> list[TokenInfo]:
    """TokenInfo of `ids`, each scored by the matching row of `logits` (rows, vocab)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(ids, device=logp.device)[:, None])[:, 0].tolist()
    best = torch.topk(logp, top, dim=-1) if top else None
    out = []
    for r, (i, lp) in enumerate(zip(ids, chosen)):
        alts = list(zip(best.indices[r].tolist(), best.values[r].tolist())) if best is not None else []
        out.append(TokenInfo(i, lp, alts))
    return out


class Engine:
    """The model, its cache and the loop that serves jobs; `submit` is safe from any thread."""

    def __init__(self, model: GPT, slots: int = 8, prefix_cache: bool = True, compiled: bool = False):
        self.model = model.eval()
        self.step = Decoder(model, compiled)  # every running sequence's next token, in one step
        self.device = next(model.parameters()).device
        dtype = model.transformer.wte.weight.dtype
        self.cache = KVCache.empty(model.config, slots, self.device, dtype)
        self.held: list[list[int]] = [[] for _ in range(slots)]  # the tokens each slot's cache holds
        self.prefix_cache = prefix_cache
        self.running: list[Job] = []  # job i is in slot i
        self.last: list[torch.Tensor] = []  # each running job's next-token logits (1, vocab)
        self.waiting: dict[object, deque[Job]] = {}  # per request, in the order they take turns
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="gpt2repro-engine", daemon=True)

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def start(self) -> Engine:
        """Serve from now on; compiled steps are compiled first, for each kind of batch (`Decoder.warm`)."""
        self.step.warm(self.cache.slots)
        self.thread.start()
        return self

    def submit(self, job: Job) -> None:
        job.generator = job.sampling.generator(self.device)
        with self.wake:
            if self.stopping:
                job.emit(("error", "the server is shutting down"))
                return
            self.waiting.setdefault(id(job) if job.group is None else job.group, deque()).append(job)
            self.wake.notify()

    def stats(self) -> dict:
        with self.wake:
            waiting = sum(len(q) for q in self.waiting.values())
        return {"running": len(self.running), "waiting": waiting, "slots": self.cache.slots}

    def stop(self) -> None:
        """Fail every job not yet finished, and end the loop."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=30)

    def _next_waiting(self) -> Job | None:
        """The first job of the request whose turn it is (that request then goes to the back)."""
        while self.waiting:
            group = next(iter(self.waiting))
            queue = self.waiting.pop(group)
            job = queue.popleft()
            if queue:
                self.waiting[group] = queue
            if not job.cancelled:  # its client left while it waited
                return job
        return None

    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                with self.wake:
                    while not self.stopping and not self.waiting and not self.running:
                        self.wake.wait()
                    if self.stopping:
                        break
                    admitted = []
                    while len(self.running) + len(admitted) < self.cache.slots:
                        job = self._next_waiting()
                        if job is None:
                            break
                        admitted.append(job)
                for job in admitted:
                    try:
                        self._prefill(job)
                    except Exception as e:  # a bug must not hang its client: fail it, keep serving
                        job.emit(("error", f"generation failed: {e}"))
                try:
                    self._sweep()
                    if self.running:
                        self._decode()
                        self._sweep()
                except Exception as e:
                    for job in self.running:
                        job.emit(("error", f"generation failed: {e}"))
                    self.running, self.last = [], []
        for job in [*self.running, *(j for q in self.waiting.values() for j in q)]:
            if not job.cancelled:
                job.emit(("error", "the server is shutting down"))

    def _cached_prefix(self, job: Job) -> tuple[int, int]:
        """The free slot whose cached tokens share the longest prefix with the job's prompt, and that
        length (at most all but the prompt's last token, whose logits the job needs)."""
        slot, best = len(self.running), 0
        if not self.prefix_cache or job.echo_logprobs:
            return slot, 0
        limit = len(job.prompt) - 1
        for s in range(len(self.running), self.cache.slots):
            held, n = self.held[s][: int(self.cache.lengths[s])], 0
            while n < min(limit, len(held)) and held[n] == job.prompt[n]:
                n += 1
            if n > best:
                slot, best = s, n
        return slot, best

    def _prefill(self, job: Job) -> None:
        slot = len(self.running)
        source, reused = self._cached_prefix(job)
        self._swap(source, slot)
        self.cache.lengths[slot] = reused
        self.held[slot] = list(job.prompt)
        job.emit(("start", reused))
        ids = torch.tensor([job.prompt[reused:]], device=self.device)
        h = self.model.hidden(ids, self.cache.slot(slot))[0]
        if job.echo_logprobs:
            scored = _infos(self.model.logits(h[:-1]), job.prompt[1:], job.logprobs or 0)
            job.emit(("prompt", [TokenInfo(job.prompt[0]), *scored]))
        self.running.append(job)
        self.last.append(self.model.logits(h[-1:]))

    def _decode(self) -> None:
        """Sample every running job's next token, then one forward pass for all of them."""
        tokens = []
        for job, logits in zip(self.running, self.last):
            tok = int(draw(logits, job.sampling, job.generator, job.drawn))  # this sequence's own penalties
            info = _infos(logits, [tok], job.logprobs)[0] if job.logprobs is not None else TokenInfo(tok)
            job.drawn.append(tok)
            job.emit(("token", info))
            if ends_reply(tok):
                job.cancelled, job.finish = True, "stop"
            tokens.append(tok)
        m = len(self.running)
        active = KVCache(self.cache.k[:, :m], self.cache.v[:, :m], self.cache.lengths[:m])
        if any(self._has_room(j) for j in self.running):  # (the finished rows ride along, then leave)
            ids = torch.tensor(tokens, device=self.device)[:, None]
            logits = self.step(ids, active)
            self.last = list(logits.split(1))
            for held, tok in zip(self.held, tokens):
                held.append(tok)

    def _has_room(self, job: Job) -> bool:
        return not job.cancelled and job.generated < job.max_tokens

    def _swap(self, i: int, j: int) -> None:
        """Trade two slots' caches (their valid positions only) and the tokens they hold."""
        if i == j:
            return
        n = int(max(self.cache.lengths[i], self.cache.lengths[j]))
        for t in (self.cache.k, self.cache.v):
            t[:, [i, j], :, :n] = t[:, [j, i], :, :n]
        self.cache.lengths[[i, j]] = self.cache.lengths[[j, i]]
        self.held[i], self.held[j] = self.held[j], self.held[i]

    def _sweep(self) -> None:
        """Finish jobs that are done or cancelled, trading each one's slot for the last running one's
        (the finished sequence's cache stays in the freed slot, for prefix caching)."""
        i = 0
        while i < len(self.running):
            job = self.running[i]
            if self._has_room(job) and len(job.prompt) + job.generated < self.block_size:
                i += 1
                continue
            job.emit(("done", job.finish or "length"))
            last = len(self.running) - 1
            self._swap(i, last)
            self.running[i], self.last[i] = self.running[last], self.last[last]
            self.running.pop()
            self.last.pop()
