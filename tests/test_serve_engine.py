"""The serving engine and the text of streamed tokens, without a web server: batched decoding gives
each sequence what it gets alone, jobs past the slots wait, a stop string cuts the text."""

from __future__ import annotations

import threading

import pytest
import torch

from gpt2repro.generation.generate import generate
from gpt2repro.generation.sampling import GREEDY, Sampling
from gpt2repro.model.gpt import GPT
from gpt2repro.serve.engine import Engine, Job
from gpt2repro.text.tokentext import TextStream


@pytest.fixture(scope="module")
def model(tiny_config):
    torch.manual_seed(0)
    return GPT(tiny_config).eval()


def run_jobs(engine: Engine, specs: list[dict], check=None) -> list[list[tuple]]:
    """Submit jobs (before the engine starts, so all wait at once), start it, collect their events."""
    events = [[] for _ in specs]
    done = threading.Semaphore(0)

    def emitter(i):
        def emit(event):
            if check:
                check()
            events[i].append(event)
            if event[0] in ("done", "error"):
                done.release()

        return emit

    for i, spec in enumerate(specs):
        engine.submit(Job(emit=emitter(i), **spec))
    assert engine.stats()["waiting"] == len(specs)
    engine.start()
    for _ in specs:
        assert done.acquire(timeout=60)
    engine.stop()
    return events


def test_batched_sequences_of_different_lengths_equal_each_alone_and_wait_for_a_slot(model):
    torch.manual_seed(1)
    prompts = [torch.randint(0, 50257, (n,)).tolist() for n in (5, 9, 3, 7, 11)]
    engine = Engine(model, slots=2)
    seen = []
    events = run_jobs(
        engine,
        [dict(prompt=p, max_tokens=4 + i, sampling=Sampling(0)) for i, p in enumerate(prompts)],
        check=lambda: seen.append(len(engine.running)),
    )
    assert max(seen) == 2  # never more running than slots: the rest waited
    for i, p in enumerate(prompts):
        tokens = [e[1].id for e in events[i] if e[0] == "token"]
        assert tokens == generate(model, torch.tensor([p]), 4 + i, sampling=GREEDY)[0, len(p) :].tolist()
        assert events[i][-1] == ("done", "length")


def test_a_seed_draws_the_same_sample_batched_or_alone(model):
    spec = dict(prompt=[464, 5822, 286], max_tokens=12, sampling=Sampling(1.0, None, 0.95, 5))
    alone = run_jobs(Engine(model, slots=1), [spec])[0]
    crowd = run_jobs(
        Engine(model, slots=4), [dict(spec, sampling=Sampling(1.0, None, 0.95, s)) for s in (1, 5, 9)]
    )
    assert crowd[1] == alone


def test_text_streams_whole_characters_and_holds_back_a_possible_stop_string(enc):
    ids = enc.encode("café, then END of it")
    stream = TextStream(enc.decode_single_token_bytes, stop=("END",))
    pieces = [stream.feed(t) for t in ids]
    assert "".join(pieces) + stream.finish() == "café, then "
    assert stream.stopped and all("\ufffd" not in p for p in pieces)
    split = TextStream(lambda t: "é".encode()[t : t + 1])  # one character over two tokens
    assert (split.feed(0), split.feed(1)) == ("", "é")
    held = TextStream(enc.decode_single_token_bytes, stop=("Xylophone",))
    assert "".join(held.feed(t) for t in enc.encode("a X")) == "a "  # "X" may begin the stop
    assert held.finish() == "X" and not held.stopped


def test_a_job_cancelled_while_it_waits_never_takes_a_slot(model):
    engine = Engine(model, slots=1)
    events, done = [], threading.Event()
    gone = Job([464, 5822], 3, emit=lambda e: events.append(("gone", e)), sampling=Sampling(0))
    kept = Job([464, 5822], 3, emit=lambda e: (events.append(("kept", e)), e[0] == "done" and done.set()))
    engine.submit(kept)
    engine.submit(gone)
    gone.cancelled = True  # its client left before a slot was free
    engine.start()
    assert done.wait(60)
    engine.stop()
    assert [who for who, _ in events] == ["kept"] * 5  # start, 3 tokens, done


def test_a_prompt_that_begins_with_a_slots_cached_tokens_runs_only_the_rest(model):
    """A second turn re-sends the first turn's prompt and reply: with prefix caching it finds them in
    the slot the first left and runs only its new tokens, and draws what a fresh engine draws."""
    first = [464, 5822, 286, 262]
    turn = run_jobs(Engine(model, slots=2), [dict(prompt=first, max_tokens=5, sampling=Sampling(0))])[0]
    reply = [e[1].id for e in turn if e[0] == "token"]
    second = [*first, *reply, 13, 198, 40]
    results = {}
    for on in (True, False):
        engine, ran = Engine(model, slots=2, prefix_cache=on), []
        hidden = model.hidden

        def counted(idx, cache=None, hidden=hidden, ran=ran):
            ran.append(idx.size(1))
            return hidden(idx, cache)

        model.hidden = counted
        try:
            events = run_jobs(engine, [dict(prompt=first, max_tokens=5, sampling=Sampling(0))])
            engine.thread = threading.Thread(target=engine._loop, daemon=True)  # start it again
            engine.stopping, ran[:] = False, []
            events = run_jobs(engine, [dict(prompt=second, max_tokens=6, sampling=Sampling(0))])[0]
        finally:
            model.hidden = hidden
        results[on] = ([e[1].id for e in events if e[0] == "token"], events[0], ran[0])
    cached, fresh = results[True], results[False]
    assert cached[1] == ("start", len(first) + len(reply) - 1)  # all the first sequence's cache holds
    assert cached[2] == len(second) - cached[1][1] and fresh[1] == ("start", 0) and fresh[2] == len(second)
    assert cached[0] == fresh[0]


def test_a_compiled_engine_compiles_before_serving_and_decodes_as_the_eager_one(model):
    """`serve --compile`: every kind of batch (one slot; several at different lengths, any number)
    compiled at start, none while serving; each sequence's greedy tokens those it gets alone."""
    from torch._dynamo.utils import counters

    torch.manual_seed(2)
    prompts = [torch.randint(0, 50257, (n,)).tolist() for n in (5, 9, 3, 7, 11)]
    engine = Engine(model, slots=3, compiled=True)
    graphs = []
    events = run_jobs(
        engine,
        [dict(prompt=p, max_tokens=3 + 2 * i, sampling=Sampling(0)) for i, p in enumerate(prompts)],
        check=lambda: graphs.append((counters["stats"]["unique_graphs"], len(engine.running))),
    )
    assert {n for _, n in graphs} >= {1, 2, 3}  # batches of 3, 2 and 1 ran
    assert len({g for g, _ in graphs}) == 1  # and none of them compiled
    for i, p in enumerate(prompts):
        tokens = [e[1].id for e in events[i] if e[0] == "token"]
        assert tokens == generate(model, torch.tensor([p]), 3 + 2 * i, sampling=GREEDY)[0, len(p) :].tolist()
