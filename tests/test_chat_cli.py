"""`gpt2repro chat`: --message, a real terminal (tmux), the KV cache kept across turns (counted
forward tokens), old turns dropped with a notice, streamed text, and the errors."""

import shutil
import subprocess
import sys
import time

import pytest
import torch
from helpers import assert_one_line_error

from conftest import ROOT, shared_file
from gpt2repro.checkpoint.gathered import load_model
from gpt2repro.cli import main
from gpt2repro.config.schema import model_config
from gpt2repro.generation.chat_session import ChatSession
from gpt2repro.generation.generate import GenerateError
from gpt2repro.model.gpt import GPT
from gpt2repro.text import chat
from gpt2repro.text.tokentext import TextStream


def test_message_answers_once_and_reports_the_timings(chat_run_dir, capsys):
    assert main(["chat", "--checkpoint", str(chat_run_dir), "--message", "Hi", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out == "Hello there.\n"
    assert "1 replies, 3 tokens: first token after" in err and "tokens/s decoding" in err


def test_chat_errors(chat_run_dir, run_dir, capsys):
    fragment = "is a base model without chat tokens (model.chat=false): fine-tune it with the sft preset"
    assert_one_line_error(capsys, ["chat", "--checkpoint", run_dir, "--message", "Hi"], fragment)
    assert_one_line_error(
        capsys, ["chat", "--hf", shared_file("tiny-gpt2"), "--message", "Hi"], "`gpt2repro sample`"
    )
    base = ["chat", "--checkpoint", chat_run_dir]
    assert_one_line_error(
        capsys, [*base, "--message", "a <|user_end|>"], "contains the special token <|user_end|>"
    )
    assert_one_line_error(capsys, [*base, "--message", "word " * 200], "this model's context is 128")
    assert_one_line_error(capsys, [*base, "--message", "Hi", "--top-k", "-1"], "top_k must be at least 0")
    assert_one_line_error(capsys, [*base, "--message", "Hi", "--system", "<|endoftext|>"], "special token")


class Counted:
    """The model, with every forward pass's tokens and position recorded."""

    def __init__(self, model):
        self.calls = []
        real = model.hidden

        def hidden(idx, cache=None, **kw):
            self.calls.append((int(cache.lengths[0]) if cache is not None else 0, idx.size(1)))
            return real(idx, cache, **kw)

        model.hidden = hidden


def test_a_new_turn_encodes_only_its_new_tokens(chat_run_dir):
    model = load_model(chat_run_dir)
    counted = Counted(model)
    session = ChatSession(model, temperature=0, max_new_tokens=6)
    first = session.reply("Hi")
    turn1 = chat.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert counted.calls[0] == (0, len(turn1)) and all(n == 1 for _, n in counted.calls[1:])
    in_cache = len(session.ids) - 1  # all but the end token the reply closed with
    counted.calls.clear()
    second = session.reply("Who are you?")
    new = chat.render([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True)[1:]
    assert counted.calls[0] == (in_cache, 1 + len(new))  # the end token, then the new turn: no history
    assert session.turns[1]["prompt_tokens"] == 1 + len(new)
    # re-encoding the whole history each turn gives the same replies, at the cost the cache saves
    again = ChatSession(load_model(chat_run_dir), temperature=0, max_new_tokens=6, reuse_cache=False)
    assert (again.reply("Hi"), again.reply("Who are you?")) == (first, second)
    assert again.turns[1]["prompt_tokens"] == in_cache + 1 + len(new)
    assert session.forward_tokens < again.forward_tokens


def test_old_turns_are_dropped_with_a_notice_when_the_context_fills(chat_run_dir):
    notices = []
    model = load_model(chat_run_dir)
    counted = Counted(model)
    session = ChatSession(model, system="Be kind.", temperature=0, max_new_tokens=8, on_notice=notices.append)
    for i in range(6):
        session.reply(f"message number {i}: " + "words " * 12)
    assert notices and "outgrew the 128-token context: dropped its 1 oldest turn(s)" in notices[0]
    assert session.messages[0] == {"role": "system", "content": "Be kind."}
    assert len(session.ids) <= 128 and session.ids[:3] == chat.render(session.messages[:1])[:3]
    restarts = [n for pos, n in counted.calls if pos == 0]
    assert len(restarts) == 1 + len(notices)  # the first turn and each re-encoding after a drop
    kept = list(session.messages)
    with pytest.raises(GenerateError, match="context is 128"):
        session.reply("word " * 200)
    assert session.messages == kept  # a message too long even alone loses nothing
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be kind."}] and session.ids == []


def test_streamed_text_holds_back_split_characters(enc):
    text = "naïve 日本語 😀🚀 done"
    stream = TextStream(enc.decode_single_token_bytes)  # what `gpt2repro chat` writes
    pieces = [stream.feed(t) for t in enc.encode_ordinary(text)] + [stream.finish()]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert "" in pieces  # a token ending mid-character printed nothing yet


def test_chat_refuses_bad_sampling_and_base_models():
    with pytest.raises(GenerateError, match="base model without chat tokens"):
        ChatSession(GPT(model_config("tiny")))
    with pytest.raises(GenerateError, match="max_new_tokens >= 1"):
        ChatSession(GPT(model_config("tiny").as_chat()), max_new_tokens=0)


SOCKET = f"gpt2repro-test-{time.time_ns()}"  # a tmux server of our own, started with our environment


def _tmux(*args, check=True):
    return subprocess.run(["tmux", "-L", SOCKET, *args], capture_output=True, text=True, check=check)


def _wait_for(text, times=1, timeout=180):  # generous: a loaded CI host starts Python slowly
    deadline = time.time() + timeout
    while time.time() < deadline:
        screen = "\n".join(
            line.rstrip() for line in _tmux("capture-pane", "-p", "-t", "chat").stdout.splitlines()
        )
        if screen.count(text) >= times:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared:\n{screen}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is absent (apt-get install -y tmux)")
def test_chat_in_a_real_terminal(chat_run_dir, monkeypatch):
    """Keys typed into a terminal, the reply read off the screen as it streams."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
    cmd = (
        f"{sys.executable} -m gpt2repro chat --checkpoint {chat_run_dir} --temperature 0 --system 'Be brief.'"
    )
    _tmux("new-session", "-d", "-s", "chat", "-x", "150", "-y", "40", f"{cmd}; echo EXITED $?; sleep 600")
    try:
        _wait_for("you>")
        _tmux("send-keys", "-t", "chat", "Hi", "Enter")
        _wait_for("assistant> Hello there.\nyou>")  # the reply ended: the next prompt is up
        _tmux("send-keys", "-t", "chat", "/reset", "Enter")
        _wait_for("[conversation reset]")
        _tmux("send-keys", "-t", "chat", "Hi", "Enter")
        screen = _wait_for("you> Hi\nassistant> Hello there.\nyou>", times=2)
        assert screen.count("Hello there.") == 2
        _tmux("send-keys", "-t", "chat", "/exit", "Enter")
        screen = _wait_for("EXITED")
        assert "EXITED 0" in screen and "2 replies, 6 tokens: first token after" in screen
    finally:
        _tmux("kill-server", check=False)


@pytest.mark.parametrize("command", ["chat", "sample"])
def test_chat_and_sample_decode_with_the_weights_laid_out_for_it(command, chat_run_dir, capsys):
    """The commands that decode prepare the model for it (`decoding.prepare`): where the transposed
    layout measures fastest, the weights are stored so; the reply is the one of the usual layout."""
    from unittest import mock

    from gpt2repro.generation import decoding, kernels

    laid, original = [], decoding.prepare

    def recorded(model, kernel=None):
        laid.append(original(model, kernel))
        return laid[-1]

    argv = [command, "--checkpoint", str(chat_run_dir), "--temperature", "0"]
    argv += (
        ["--message", "Hi"] if command == "chat" else ["--prompt", "Hi", "-n", "1", "--max-new-tokens", "3"]
    )
    columns = mock.patch.object(decoding, "choose", return_value=kernels.COLUMNS)
    with columns, mock.patch.object(decoding, "prepare", recorded):
        assert main(argv) == 0
    (model,) = laid
    head = model.lm_head.weight
    assert head.stride() == (1, head.size(0)) and head is model.transformer.wte.weight
    if command == "chat":
        assert capsys.readouterr().out == "Hello there.\n"


def test_a_re_encode_interrupted_inside_any_layer_leaves_a_cache_the_next_turn_can_trust():
    """Dropping old turns rewrites the cache from position 0: interrupted after layer 0 wrote its
    keys and values, the next turn must not reuse them as if they were the old history's."""
    torch.manual_seed(0)
    model = GPT(model_config("tiny").as_chat()).eval()
    notices = []
    session = ChatSession(model, temperature=0, max_new_tokens=4, on_notice=notices.append)
    while len(session.ids) < 100:
        session.reply("words " * 5)
    assert not notices and len(session.ids) <= 114  # "Hi" fits without dropping a turn

    def interrupt(module: torch.nn.Module, args: tuple) -> None:
        raise KeyboardInterrupt  # Ctrl-C (or out of memory) once layer 0 has rewritten its slot

    stop = model.transformer.h[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        list(session.send("words " * 30))  # needs old turns dropped: re-encoded from position 0
    stop.remove()
    assert notices  # the drop happened, then layer 1 was interrupted
    seen = []
    real = model.logits

    def logits(h: torch.Tensor) -> torch.Tensor:
        seen.append((list(session.ids), real(h)))
        return seen[-1][1]

    model.logits = logits
    session.reply("Hi")
    model.logits = real
    ids, cached = seen[0]
    with torch.no_grad():
        fresh = real(model.hidden(torch.tensor([ids]))[:, -1])
    torch.testing.assert_close(cached, fresh, rtol=0, atol=1e-5)
