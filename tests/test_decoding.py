"""One sampler and one "the reply ends here" rule (issue #29, items 1, 2 and 4): a scripted model that
says `<|endoftext|><|user_start|>` mid-reply is stopped there by every entry point; sample, chat,
serve, the in-loop and the SFT samples draw the same tokens for the same seed and settings; the
model's own reply is kept as its token ids; a turn interrupted before its reply leaves nothing."""

from __future__ import annotations

import json
import urllib.request
from types import SimpleNamespace

import pytest
import torch

from gpt2repro.config.schema import model_config
from gpt2repro.generation.chat_session import ChatSession, greedy_reply
from gpt2repro.generation.generate import sample_text, sample_tokens
from gpt2repro.generation.sampling import Sampling
from gpt2repro.interop.hf import generation_config
from gpt2repro.model.gpt import GPT
from gpt2repro.text import chat
from gpt2repro.text.tokenizer import EOT_ID

pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn) is not installed")

from gpt2repro.serve.app import create_app  # noqa: E402
from gpt2repro.serve.run import ServerThread, served_model  # noqa: E402

FILLER = 12876  # " ok": what the scripted model says past its script
USER_START = chat.TOKEN_IDS[chat.USER_START]


class Scripted(GPT):
    """A chat model that, whatever it is given, predicts token `plan[p + 1]` after position p (and
    " ok" past the plan): a reply is then exactly the plan after its prompt, for every decode loop."""

    def __init__(self, plan: list[int]):
        super().__init__(model_config("tiny").as_chat())
        self.plan = torch.tensor([*plan, *[FILLER] * self.config.block_size])

    def hidden(self, idx, cache=None):
        start = cache.lengths[:, None] if cache is not None else torch.zeros(idx.size(0), 1, dtype=torch.long)
        positions = start + torch.arange(idx.size(1))
        if cache is not None:
            cache.lengths += idx.size(1)
        return positions[..., None].float()

    def logits(self, h):
        return (
            torch.nn.functional.one_hot(self.plan[h[..., 0].long() + 1], self.config.vocab_size).float() * 1e4
        )


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _served(model, body: dict, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    served = served_model(model, "m", 2)
    try:
        with ServerThread(create_app(served)) as s:
            return _post(s.url + path, {"model": "m", **body})
    finally:
        served.engine.stop()


def test_every_entry_point_ends_a_reply_at_the_first_token_that_is_not_text(enc):
    said = [*enc.encode("Sure."), EOT_ID, USER_START, *enc.encode(" Thanks")]
    hi = chat.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    sure = enc.encode("Sure.")
    chat_model = Scripted([*hi, *said])
    assert ChatSession(chat_model, max_new_tokens=8).reply("Hi") == "Sure."
    assert greedy_reply(chat_model, hi, 8) == (sure, EOT_ID)
    assert sample_tokens(chat_model, hi, 1, 8, sampling=Sampling(seed=3)) == [sure]
    sft_cfg = SimpleNamespace(sample_prompt="Hi", sample_count=1, sample_tokens=8)
    from gpt2repro.training.sft import SFTTrainer

    assert SFTTrainer.samples(SimpleNamespace(raw=chat_model, cfg=sft_cfg)) == [
        "[user] Hi\n[assistant] Sure."
    ]
    status, r = _served(chat_model, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
    assert status == 200 and (r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"]) == (
        "Sure.",
        "stop",
    )
    base = Scripted([*enc.encode("Well"), *said])
    assert sample_text(base, "Well", n=2, max_new_tokens=8) == ["WellSure."] * 2
    from gpt2repro.training.train import Trainer

    loop_cfg = SimpleNamespace(sample_prompt="Well", sample_count=1, sample_tokens=8)
    assert Trainer.samples(SimpleNamespace(raw=base, cfg=loop_cfg, info=SimpleNamespace(rank=0))) == [
        "WellSure."
    ]
    status, r = _served(base, {"prompt": "Well", "max_tokens": 8}, "/v1/completions")
    assert (r["choices"][0]["text"], r["choices"][0]["finish_reason"]) == ("Sure.", "stop")
    ends = generation_config(chat_model.config)["eos_token_id"]  # transformers stops at the same tokens
    assert set(ends) == set(range(EOT_ID, chat_model.config.vocab_size)) and USER_START in ends


SETTINGS = dict(temperature=1.3, top_k=7, top_p=0.9)


def test_sample_chat_serve_and_sft_samples_draw_the_same_tokens_for_a_seed(chat_run_dir):
    from gpt2repro.checkpoint.gathered import load_model
    from gpt2repro.training.sft import SFTTrainer

    model = load_model(chat_run_dir).eval()
    prompt = chat.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    replies = {}
    for seed in (7, 8):
        session = ChatSession(model, max_new_tokens=12, seed=seed, **SETTINGS)
        replies[seed] = list(session.send("Hi"))
        assert sample_tokens(model, prompt, 1, 12, sampling=Sampling(**SETTINGS, seed=seed)) == [
            replies[seed]
        ]
    assert replies[7] != replies[8]
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12, "seed": 7, **SETTINGS}
    served = served_model(model, "m", 2)
    try:
        with ServerThread(create_app(served)) as s:
            r = _post(s.url + "/v1/chat/completions", {"model": "m", **body})[1]
            by_ids = _post(s.url + "/v1/completions", {"model": "m", "prompt": prompt, **body})[1]
            defaults = {"model": "m", "messages": body["messages"], "max_tokens": 12, "seed": 42, "top_k": 50}
            as_sft = _post(s.url + "/v1/chat/completions", defaults)[1]
    finally:
        served.engine.stop()
    assert r["choices"][0]["message"]["content"] == chat.decode(replies[7])
    assert by_ids["choices"][0]["text"] == chat.decode(replies[7])
    cfg = SimpleNamespace(sample_prompt="Hi", sample_count=1, sample_tokens=12)  # seed 42, top-50
    sft_sample = SFTTrainer.samples(SimpleNamespace(raw=model, cfg=cfg))[0]
    assert sft_sample == "[user] Hi\n[assistant] " + as_sft["choices"][0]["message"]["content"]


def test_in_loop_samples_and_sample_equal_the_servers_choices_for_a_seed(run_dir):
    from gpt2repro.checkpoint.gathered import load_model
    from gpt2repro.training.train import Trainer

    model = load_model(run_dir).eval()
    cfg = SimpleNamespace(sample_prompt="ROMEO:", sample_count=2, sample_tokens=10)
    in_loop = Trainer.samples(SimpleNamespace(raw=model, cfg=cfg, info=SimpleNamespace(rank=0)))
    assert in_loop == sample_text(model, "ROMEO:", 2, 10, sampling=Sampling(top_k=50, seed=42))
    served = served_model(model, "m", 2)
    try:
        with ServerThread(create_app(served)) as s:
            body = {"model": "m", "prompt": "ROMEO:", "max_tokens": 10, "n": 2, "seed": 42, "top_k": 50}
            r = _post(s.url + "/v1/completions", body)[1]
    finally:
        served.engine.stop()
    assert ["ROMEO:" + c["text"] for c in sorted(r["choices"], key=lambda c: c["index"])] == in_loop
    assert in_loop[0] != in_loop[1]  # choice i is drawn with seed + i


def test_the_models_own_reply_is_kept_as_its_tokens_and_never_blocks_the_conversation(enc):
    spelled = [27, 91, 437, 1659, 5239, 91, 29]  # "<|endoftext|>" out of ordinary tokens
    hi = chat.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    model = Scripted([*hi, *spelled, chat.ASSISTANT_END_ID])
    session = ChatSession(model, max_new_tokens=10)
    assert session.reply("Hi") == "<|endoftext|>"
    assert session.ids == [*hi, *spelled, chat.ASSISTANT_END_ID]  # the model's ids, as it drew them
    assert session.reply("And?") == " ok" * 10  # the next turn goes on (the history is not re-checked)
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    with pytest.raises(chat.ChatError, match="special token"):
        list(session.send("I type <|endoftext|>"))  # what the user types still is checked
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<|endoftext|>"},
               {"role": "user", "content": "And?"}]  # fmt: skip
    status, r = _served(model, {"messages": history, "max_tokens": 2})  # the web page re-sends it
    assert status == 200, r


def test_a_turn_interrupted_before_its_reply_leaves_the_conversation_as_it_was(chat_run_dir):
    from gpt2repro.checkpoint.gathered import load_model

    model = load_model(chat_run_dir).eval()
    session = ChatSession(model, temperature=0, max_new_tokens=6)
    first = session.reply("Hi")
    before = (list(session.messages), list(session.ids), session.cached)
    real = model.hidden

    def interrupted(idx, cache=None):
        raise KeyboardInterrupt  # Ctrl-C while the new turn's prompt runs

    model.hidden = interrupted
    with pytest.raises(KeyboardInterrupt):
        list(session.send("Who are you?"))
    model.hidden = real
    assert (session.messages, session.ids, session.cached) == before
    again = ChatSession(model, temperature=0, max_new_tokens=6)
    again.reply("Hi")
    assert session.reply("Who are you?") == again.reply("Who are you?")  # as if never interrupted
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2 and first
