"""`gpt2repro bench chat`: a multi-turn conversation at the demo size (the `cpu-demo` model, 256
positions), its first-token latency and decoding speed per turn, with the conversation kept in the
KV cache (a turn encodes only its new tokens) against encoding the whole history again every turn.

Random weights, with the rows of the special tokens zeroed so greedy replies never end early: every
reply is exactly `REPLY` tokens, every user turn `USER` tokens, so both modes do the same decoding
and differ only in what each turn's prefill encodes."""

from __future__ import annotations

import statistics

import torch

from ..config.schema import model_config
from ..generation.chat_session import ChatSession
from ..generation.decoding import prepare
from ..model.gpt import GPT
from ..text import chat
from ..text.tokenizer import EOT_ID

TURNS, USER, REPLY = 4, 24, 32  # 4 turns of 24 + 32 tokens fill ~240 of the 256 positions


def demo_size_chat_model(device: torch.device) -> GPT:
    torch.manual_seed(0)
    model = GPT(model_config("cpu-demo", vocab_multiple=64).as_chat()).to(device).eval()
    with torch.no_grad():
        model.transformer.wte.weight[EOT_ID : model.config.vocab_size] = 0  # never the argmax
    return prepare(model)  # as `gpt2repro chat` runs it


def _conversation(model: GPT, reuse_cache: bool, messages: list[str]) -> list[dict]:
    session = ChatSession(model, temperature=0, max_new_tokens=REPLY, reuse_cache=reuse_cache)
    for text in messages:
        for _ in session.send(text):
            pass
    if any(t["reply_tokens"] != REPLY for t in session.turns) or len(session.messages) != 2 * TURNS:
        raise RuntimeError("bench chat: a reply ended early or a turn was dropped; the comparison is void")
    return session.turns


def bench_chat(repeats: int, device: torch.device) -> list[dict]:
    """Per turn and mode: tokens the turn's prefill ran, first-token latency, decoding tokens/s
    (medians over `repeats` conversations of each mode, interleaved, after one warm-up each)."""
    model = demo_size_chat_model(device)
    enc = chat.encoding()
    words = enc.decode(list(range(1000, 1000 + USER)))  # any text; re-encoded to about USER tokens
    messages = [f"{i} {words}" for i in range(TURNS)]
    modes = (True, False)
    runs: dict[bool, list] = {reuse: [] for reuse in modes}
    with torch.no_grad():
        for reuse in modes:
            _conversation(model, reuse, messages)  # warm-up
        for _ in range(repeats):  # interleaved: a busy spell of the host hits both modes alike
            for reuse in modes:
                runs[reuse].append(_conversation(model, reuse, messages))
    rows = []
    for reuse in modes:
        for turn in range(TURNS):
            seen = [r[turn] for r in runs[reuse]]
            rows.append(
                {
                    "history": "kv-cache kept" if reuse else "re-encoded",
                    "turn": turn + 1,
                    "prefill_tokens": seen[0]["prompt_tokens"],
                    "first_token_ms": 1000 * statistics.median(t["first_token_s"] for t in seen),
                    "decode_tok_per_s": statistics.median(t["decode_steps"] / t["decode_s"] for t in seen),
                }
            )
    return rows
