"""The chat format: its tokens in the padded rows, rendering with exact loss masks, its config, and a
base model gaining the chat tokens without any resizing."""

import dataclasses

import pytest
import torch

from conftest import shared_file
from gpt2repro.config.presets import train_config
from gpt2repro.config.schema import CHAT_VOCAB_SIZE, ConfigError, GPTConfig, model_config
from gpt2repro.generation.sampling import ends_reply
from gpt2repro.interop.hf import load_hf
from gpt2repro.model.gpt import GPT
from gpt2repro.text import chat

S, SE, U, UE, A, AE = (chat.TOKEN_IDS[t] for t in chat.CHAT_TOKENS)
EOT = 50256

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": " 4"},
        {"role": "user", "content": "And 3+3?\n"},
        {"role": "assistant", "content": "6\n\nDone."},
    ],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "unicode: café naïve Ωμέγα 日本語 😀🚀 \u200b"},
        {"role": "assistant", "content": "  leading spaces and\ttabs  "},
    ],
    [{"role": "user", "content": "only a question"}],
]


def test_chat_tokens_take_the_rows_after_gpt2s_vocabulary():
    assert [S, SE, U, UE, A, AE] == list(range(50257, 50263))
    assert CHAT_VOCAB_SIZE == 50263
    assert [ends_reply(t) for t in (50255, 50256, AE)] == [False, True, True]  # a reply ends at any non-text
    cfg = model_config("tiny", vocab_multiple=64)
    assert cfg.padded_vocab_size == dataclasses.replace(cfg, vocab_size=CHAT_VOCAB_SIZE).padded_vocab_size


def test_render_marks_exactly_the_assistant_text_and_its_end(enc):
    ids, mask = chat.render_with_mask(CONVERSATIONS[1])
    e = enc.encode_ordinary
    expected = [EOT, S, *e("You are terse."), SE, U, *e("What is 2+2?"), UE] + [
        A,
        *e(" 4"),
        AE,
        U,
        *e("And 3+3?\n"),
        UE,
        A,
        *e("6\n\nDone."),
        AE,
    ]
    assert ids == expected
    learned = [i for i, m in enumerate(mask) if m]
    first = expected.index(A) + 1
    second = len(expected) - 1 - expected[::-1].index(A) + 1
    want = list(range(first, first + len(e(" 4")) + 1)) + list(range(second, len(expected)))
    assert learned == want
    assert [ids[i] for i in learned] == [*e(" 4"), AE, *e("6\n\nDone."), AE]
    prompt = chat.render(CONVERSATIONS[0], add_generation_prompt=True)
    assert prompt == [EOT, U, *e("Hi"), UE, A, *e("Hello!"), AE, A]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_rendered_text_encodes_back_to_the_same_ids(messages, enc):
    for prompt in (False, True):
        text = chat.render_text(messages, prompt)
        assert chat.encoding().encode(text, allowed_special="all") == chat.render(messages, prompt)
        assert chat.decode(chat.render(messages, prompt)) == text


BAD = [
    ([], "empty conversation"),
    ([{"role": "bot", "content": "x"}], "message 0: unknown role 'bot'"),
    ([{"role": "user"}], r"message 0 \(user\): missing content"),
    ([{"role": "user", "content": 3}], r"message 0 \(user\): content is int, not text"),
    ([{"role": "assistant", "content": "hi"}], "message 0: an assistant turn before any user message"),
    (
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "hi"}],
        "message 1: an assistant turn before any user message",
    ),
    (
        [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
        "message 1: a system message may only come first",
    ),
    ([{"role": "user", "content": "say <|user_end|> now"}], "contains the special token <|user_end|>"),
    (["hello"], "message 0 is str, not an object"),
]


@pytest.mark.parametrize("messages,problem", BAD)
def test_bad_conversations_are_one_line_errors(messages, problem, enc):
    with pytest.raises(chat.ChatError, match=problem) as err:
        chat.render(messages)
    assert "\n" not in str(err.value)


def test_chat_config_extends_gpt2s_vocabulary():
    cfg = train_config("cpu-tiny", ["model.chat=true"])
    assert cfg.model.chat and cfg.model.vocab_size == CHAT_VOCAB_SIZE and cfg.model.padded_vocab_size == 50304
    assert train_config("cpu-tiny", ["model.chat=true", "model.chat=false"]).model.vocab_size == 50257
    with pytest.raises(ConfigError, match="model.chat=true needs model.vocab_size=50263"):
        GPTConfig(chat=True).validate()
    with pytest.raises(ConfigError, match="the chat tokens extend GPT-2's vocabulary"):
        GPTConfig(vocab_size=1000).as_chat()
    assert GPTConfig().as_chat() == GPTConfig(chat=True, vocab_size=CHAT_VOCAB_SIZE)
    # init_from takes the architecture from the weights, but a run may make it a chat model
    assert train_config("finetune", ["model.chat=true"]).model.chat


def test_a_base_model_gains_the_chat_rows_deliberately(tiny_config):
    torch.manual_seed(0)
    base = GPT(tiny_config)
    torch.manual_seed(1)
    target = GPT(tiny_config.as_chat())
    fresh = target.transformer.wte.weight.detach().clone()
    target.copy_weights_from(base)
    got, src = target.transformer.wte.weight.detach(), base.transformer.wte.weight.detach()
    assert target.lm_head.weight is target.transformer.wte.weight
    torch.testing.assert_close(got[:50257], src[:50257], rtol=0, atol=0)
    torch.testing.assert_close(got[50257:50263], fresh[50257:50263] + src[:50257].mean(0), rtol=0, atol=0)
    torch.testing.assert_close(got[50263:], fresh[50263:], rtol=0, atol=0)  # padding: its own init
    for name, p in base.named_parameters():
        if "wte" not in name:
            torch.testing.assert_close(target.get_parameter(name), p, rtol=0, atol=0)


def test_transformers_checkpoints_load_padded_as_our_presets(enc):
    model = load_hf(shared_file("tiny-gpt2"))
    assert model.config.vocab_size == 50257 and model.config.padded_vocab_size == 50304
    assert not model.config.chat
    assert model.transformer.wte.weight[50257:].abs().sum() == 0  # padding: never predicted
    target = GPT(model.config.as_chat())
    target.copy_weights_from(model)  # no resizing anywhere: the chat rows exist already
    assert target.transformer.wte.weight.shape == model.transformer.wte.weight.shape


# --- the export: transformers applies our template to the same ids, and stops where we stop ---

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def chat_export(chat_run_dir, tmp_path_factory):
    from gpt2repro.checkpoint.gathered import load_model
    from gpt2repro.interop.hf import export_hf

    return export_hf(load_model(chat_run_dir), tmp_path_factory.mktemp("chat-export") / "hf")


MULTI_TURN = [
    {"role": "system", "content": "Ünïcödé system: 日本語 😀"},
    {"role": "user", "content": "First question?"},
    {"role": "assistant", "content": "First answer.\n"},
    {"role": "user", "content": "  second, with spaces  "},
    {"role": "assistant", "content": "Ωμέγα\ttab"},
    {"role": "user", "content": "{{ not jinja }} {% raw %}"},
]


@pytest.mark.parametrize("messages", [*CONVERSATIONS, MULTI_TURN], ids=range(5))
def test_transformers_apply_chat_template_gives_our_ids(chat_export, messages):
    tok = transformers.AutoTokenizer.from_pretrained(chat_export)
    for prompt in (True, False):
        got = tok.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)["input_ids"]
        assert got == chat.render(messages, add_generation_prompt=prompt)
        assert tok.apply_chat_template(
            messages, add_generation_prompt=prompt, tokenize=False
        ) == chat.render_text(messages, prompt)
    assert tok.convert_ids_to_tokens([S, AE]) == ["<|system_start|>", "<|assistant_end|>"]


@pytest.mark.parametrize("messages,problem", [BAD[4], BAD[6], BAD[1]])
def test_the_template_refuses_what_render_refuses(chat_export, messages, problem):
    tok = transformers.AutoTokenizer.from_pretrained(chat_export)
    with pytest.raises(Exception, match="start with a user message|only come first|unknown role"):
        tok.apply_chat_template(messages, tokenize=False)


def test_the_export_stops_at_the_end_of_the_assistants_turn(chat_export, chat_run_dir):
    import json

    from gpt2repro.checkpoint.gathered import load_model
    from gpt2repro.generation.chat_session import ChatSession
    from gpt2repro.interop.hf import load_hf

    gen = json.loads((chat_export / "generation_config.json").read_text())
    assert gen["eos_token_id"] == list(range(50256, CHAT_VOCAB_SIZE))  # every token that is not text
    session = ChatSession(load_model(chat_run_dir), temperature=0, max_new_tokens=20)
    ours = list(session.send("Hi"))
    assert session.turns[-1]["stopped"] and chat.decode(ours) == "Hello there."
    model = transformers.AutoModelForCausalLM.from_pretrained(chat_export)
    prompt = torch.tensor([chat.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)])
    theirs = model.generate(prompt, max_new_tokens=20, do_sample=False)[0, prompt.size(1) :].tolist()
    assert theirs == [*ours, AE]  # the same reply, ended by the end-of-turn token
    pipe = transformers.pipeline("text-generation", model=str(chat_export))
    answer = pipe([{"role": "user", "content": "Hi"}], max_new_tokens=20, do_sample=False)[0][
        "generated_text"
    ]
    assert answer[-1] == {"role": "assistant", "content": "Hello there."}
    back = load_hf(chat_export)
    assert back.config.chat and back.config.vocab_size == CHAT_VOCAB_SIZE
    from gpt2repro.cli import main

    assert main(["chat", "--hf", str(chat_export), "--message", "Hi", "--temperature", "0"]) == 0


def test_a_base_export_has_no_chat_tokens(tmp_path):
    import json

    from gpt2repro.interop.hf import export_hf

    out = export_hf(GPT(model_config("tiny")), tmp_path / "base")
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" not in tok_cfg and "gpt2repro_chat" not in json.loads(
        (out / "config.json").read_text()
    )
