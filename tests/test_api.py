"""The Python API as a user calls it (`import gpt2repro; gpt2repro.load(...)`): the same text as the
CLI, which calls it too, the same scores as `eval`, exports that load back to the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_main

import gpt2repro
from gpt2repro.errors import UserError
from gpt2repro.text.tokenizer import get_tokenizer


def test_import_is_light_and_names_the_api():
    assert set(gpt2repro.__all__) == {"LLM", "__version__", "load"}
    with pytest.raises(AttributeError):
        gpt2repro.nothing_here  # noqa: B018


def test_samples_generate_and_stream_are_the_clis_text(run_dir, capsys):
    llm = gpt2repro.load(run_dir, device="cpu")
    prompt = "ROMEO:"
    samples = llm.samples(prompt, 3, max_new_tokens=12, seed=7, top_k=20)
    code, out, _ = run_main(
        capsys, "sample", "--checkpoint", run_dir, "--prompt", prompt, "-n", "3", "--max-new-tokens", "12",
        "--seed", "7", "--top-k", "20", "--device", "cpu",
    )  # fmt: skip
    assert code == 0 and out.splitlines() == [f"> {s}" for s in samples]
    assert len(set(samples)) > 1 and all(s.startswith(prompt) for s in samples)  # sample i: seed + i
    one = llm.generate(prompt, max_new_tokens=12, seed=7, top_k=20)
    assert one == samples[0]
    assert prompt + "".join(llm.stream(prompt, max_new_tokens=12, seed=7, top_k=20)) == one


def test_the_penalties_and_logit_bias_are_the_clis_and_the_servers_meaning(run_dir, capsys):
    """sample's --presence-penalty, --frequency-penalty and --logit-bias are the API's keywords (the
    server's settings, `Sampling`); +100 on a token makes it every draw, -100 bans it."""
    llm = gpt2repro.load(run_dir, device="cpu")
    prompt, settings = "ROMEO:", dict(max_new_tokens=12, seed=7, top_k=20)
    penalized = llm.samples(
        prompt, 2, presence_penalty=1.5, frequency_penalty=0.8, logit_bias={13: 3.0}, **settings
    )
    code, out, err = run_main(
        capsys, "sample", "--checkpoint", run_dir, "--prompt", prompt, "-n", "2", "--max-new-tokens", "12",
        "--seed", "7", "--top-k", "20", "--presence-penalty", "1.5", "--frequency-penalty", "0.8",
        "--logit-bias", "13=3", "--device", "cpu",
    )  # fmt: skip
    assert code == 0 and out.splitlines() == [f"> {s}" for s in penalized], err
    assert penalized != llm.samples(prompt, 2, **settings)
    assert llm.generate(prompt, max_new_tokens=4, logit_bias={13: 100}) == prompt + "...."  # token 13: "."
    greedy = llm.generate(prompt, max_new_tokens=1, temperature=0)[len(prompt) :]
    (first,) = get_tokenizer().encode_ordinary(greedy)
    assert llm.generate(prompt, max_new_tokens=1, temperature=0, logit_bias={first: -100}) != prompt + greedy


def test_hellaswag_is_evals_score(run_dir, capsys, tmp_path):
    llm = gpt2repro.load(run_dir, device="cpu")
    scores = llm.hellaswag(limit=8)
    code, _, _ = run_main(
        capsys, "eval", "hellaswag", "--checkpoint", run_dir, "--limit", "8", "--device", "cpu",
        "--json", tmp_path / "hs.json",
    )  # fmt: skip
    assert code == 0 and scores == json.loads((tmp_path / "hs.json").read_text())["completion"]


def test_an_export_loads_back_to_the_same_logits(run_dir, tmp_path):
    llm = gpt2repro.load(run_dir, device="cpu")
    again = gpt2repro.load(llm.export(tmp_path / "hf"), device="cpu", kind="hf")
    ids = torch.tensor([[464, 2068, 7586, 21831]])
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids)[0], llm.model(ids)[0], rtol=0, atol=1e-5)
    assert llm.export(tmp_path / "m.gguf", format="gguf").stat().st_size > 0
    with pytest.raises(UserError, match="format must be hf or gguf"):
        llm.export(tmp_path / "x", format="onnx")
    with pytest.raises(UserError, match="kind must be auto, checkpoint or hf"):
        gpt2repro.load(run_dir, kind="mine")


def test_a_chat_is_the_terminal_chats_reply(chat_run_dir, capsys):
    chat = gpt2repro.load(chat_run_dir, device="cpu").chat(system="Be brief.", max_new_tokens=16, seed=3)
    reply = chat.reply("Good morrow")
    code, out, _ = run_main(
        capsys, "chat", "--checkpoint", chat_run_dir, "--system", "Be brief.", "--message", "Good morrow",
        "--max-new-tokens", "16", "--seed", "3", "--device", "cpu",
    )  # fmt: skip
    assert code == 0 and out.strip() == reply.strip()
    forced = gpt2repro.load(chat_run_dir, device="cpu").chat(max_new_tokens=4, logit_bias={13: 100})
    assert forced.reply("Good morrow") == "...."  # token 13, "." : every draw, as sample's
    code, out, _ = run_main(
        capsys, "chat", "--checkpoint", chat_run_dir, "--message", "Good morrow", "--max-new-tokens", "4",
        "--logit-bias", "13=100", "--device", "cpu",
    )  # fmt: skip
    assert code == 0 and out.strip() == "...."
