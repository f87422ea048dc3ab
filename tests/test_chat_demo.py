"""`bench chat` (the cache kept against the history re-encoded) and the chat demo end to end on a
tiny budget (its numbers are measured by running it, never asserted here)."""

import importlib.util
import subprocess
import sys

import pytest

from conftest import ROOT, shared_file
from gpt2repro.bench import chat as bench_chat
from gpt2repro.bench import runners as bench
from gpt2repro.text import chat


def test_bench_chat_encodes_only_new_turns_with_the_cache_kept(monkeypatch, capsys):
    monkeypatch.setattr(bench_chat, "TURNS", 3)
    monkeypatch.setattr(bench_chat, "REPLY", 4)
    rows = bench.run("chat", repeats=1)["results"]
    kept = [r["prefill_tokens"] for r in rows if r["history"] == "kv-cache kept"]
    again = [r["prefill_tokens"] for r in rows if r["history"] == "re-encoded"]
    assert kept[0] == again[0] and len(kept) == len(again) == 3
    assert kept[1] == kept[2] < again[1] < again[2]  # the new turn only, against all of the history
    # kept: the cut reply's last token, its end token and the new turn; the history grows by that turn,
    # the 4-token reply and its end
    assert again[2] - again[1] == (kept[1] - 2) + 4 + 1
    assert all(r["first_token_ms"] > 0 and r["decode_tok_per_s"] > 0 for r in rows)
    assert "first_token_ms" in capsys.readouterr().out


def _demo():
    spec = importlib.util.spec_from_file_location("chat_demo", ROOT / "scripts" / "chat_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_demo_builds_conversations_from_wikitext_and_shakespeare():
    demo = _demo()
    wiki = demo.wiki_conversations([shared_file("wikitext-2") / "valid.txt"])
    first = wiki[0]["messages"]
    assert first[0] == {"role": "user", "content": "Tell me about Homarus gammarus."}
    assert first[1]["content"].startswith("Homarus gammarus, known as the European lobster")
    assert first[2]["content"] == "What about its description?"
    assert " @-@ " not in str(wiki) and all(chat.render(c["messages"]) for c in wiki)
    dialogue = demo.shakespeare_conversations(shared_file("tinyshakespeare.txt"))
    assert dialogue[0]["messages"][0]["content"].startswith("Before we proceed any further, hear me speak.")
    assert dialogue[0]["messages"][1]["content"] == "Speak, speak."
    assert demo.detokenize("a @-@ b , c ( d ) 1 @,@ 000 don 't") == "a-b, c (d) 1,000 don 't"


@pytest.mark.slow
def test_chat_demo_end_to_end(run_dir, tmp_path):
    shared_file("tinyshakespeare.txt")
    cmd = [sys.executable, "scripts/chat_demo.py", "--out", str(tmp_path), "--base", str(run_dir)]
    cmd += ["--steps", "2", "--limit", "2", "--max-new-tokens", "4", "val_every=0", "sample_every=0"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for what in ("conversations", "before fine-tuning", "after fine-tuning", "held-out question"):
        assert what in result.stdout
    assert result.stdout.count("template adherence") == 3 and "you> Tell me about" in result.stdout
    assert (tmp_path / "run" / "checkpoints").is_dir()
