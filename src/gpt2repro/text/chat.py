"""The chat format, in one place: the chat tokens, a conversation rendered into token ids (and which
of them training learns), the same rendering as the Jinja chat template exported for transformers,
and the tokens that end a reply.

The chat tokens take the embedding rows right after GPT-2's 50,257 (50257..50262), rows that the
64-padded vocabulary of our presets already holds, so a pretrained model gains them without any
resizing. A conversation is `<|endoftext|>` (the document separator GPT-2 was trained with) and then
each message between the start and end tokens of its role:

    <|endoftext|><|system_start|>…<|system_end|><|user_start|>…<|user_end|><|assistant_start|>…<|assistant_end|>

Message text is encoded as ordinary text, exactly as transformers' tokenizer encodes the text between
special tokens, so `render` and the template agree token for token. Text that spells a special token
is refused in what a user or system supplies: transformers would read it as that token, and a user
could close a turn by typing it. A reply is where the model spoke: the terminal chat keeps its token
ids, and the server (which gets replies back as text) reads a reply's text with `replies_as_text`,
ordinary tokens whatever it spells, so a model that spelled `<|endoftext|>` never blocks the
conversation. Where a reply ends is `sampling.ends_reply`, the same for every entry point.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import tiktoken

from ..config.schema import CHAT_VOCAB_SIZE
from ..errors import UserError
from ..files.jsonio import shown
from .tokenizer import EOT, EOT_ID, get_tokenizer

SYSTEM_START, SYSTEM_END = "<|system_start|>", "<|system_end|>"
USER_START, USER_END = "<|user_start|>", "<|user_end|>"
ASSISTANT_START, ASSISTANT_END = "<|assistant_start|>", "<|assistant_end|>"
CHAT_TOKENS = (SYSTEM_START, SYSTEM_END, USER_START, USER_END, ASSISTANT_START, ASSISTANT_END)
TOKEN_IDS = {token: EOT_ID + 1 + i for i, token in enumerate(CHAT_TOKENS)}
ASSISTANT_START_ID, ASSISTANT_END_ID = TOKEN_IDS[ASSISTANT_START], TOKEN_IDS[ASSISTANT_END]
ROLES = {
    "system": (SYSTEM_START, SYSTEM_END),
    "user": (USER_START, USER_END),
    "assistant": (ASSISTANT_START, ASSISTANT_END),
}
SPECIAL_TEXT = (EOT, *CHAT_TOKENS)
assert max(TOKEN_IDS.values()) + 1 == CHAT_VOCAB_SIZE

# transformers renders this with trim_blocks/lstrip_blocks; it holds no newline for them to eat.
CHAT_TEMPLATE = (
    "{{ '" + EOT + "' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('a system message may only come first') }}"
    "{% elif message['role'] == 'assistant' and (loop.first or (loop.index0 == 1 and "
    "messages[0]['role'] == 'system')) %}"
    "{{ raise_exception('the conversation must start with a user message') }}"
    "{% endif %}"
    + "".join(
        "{% " + ("if" if i == 0 else "elif") + f" message['role'] == '{role}' %}}"
        f"{{{{ '{start}' + message['content'] + '{end}' }}}}"
        for i, (role, (start, end)) in enumerate(ROLES.items())
    )
    + "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT_START + "' }}{% endif %}"
)


class ChatError(UserError, ValueError):
    """A conversation that cannot be rendered (unknown role, missing content, a reply first); the
    message says which message and why, in one line; `kind` names the problem for counting."""

    def __init__(self, message: str, kind: str = "bad conversation"):
        super().__init__(message)
        self.kind = kind


@functools.lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    """GPT-2's BPE with the chat tokens as special tokens: decodes replies and encodes rendered text
    (`render_text`) back into the ids `render` gives."""
    base = get_tokenizer()
    return tiktoken.Encoding(
        name="gpt2-chat",
        pat_str=base._pat_str,
        mergeable_ranks=base._mergeable_ranks,
        special_tokens={EOT: EOT_ID, **TOKEN_IDS},
        explicit_n_vocab=CHAT_VOCAB_SIZE,
    )


def spelled_special(text: str) -> str | None:
    """The first special token (<|endoftext|>, a chat token) that `text` spells, if any. Every
    prompt refuses such text, so typed text is never read as a token nor silently as look-alike
    characters: chat messages here, `sample --prompt` and `sample_prompt` in generate.prompt_tokens."""
    return next((s for s in SPECIAL_TEXT if s in text), None)


def check(messages: Sequence[dict], replies_as_text: bool = False) -> None:
    """Raise ChatError unless `messages` is a conversation: dicts with a known `role` and text
    `content`, a system message only first, a user message before any reply; special-token text only
    in replies, and there only with `replies_as_text`."""
    if not messages:
        raise ChatError("empty conversation (no messages)", "empty conversation")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatError(
                f"message {i} is {type(message).__name__}, not an object with role and content",
                "not a message",
            )
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in ROLES:  # a list or an object is no role either
            raise ChatError(
                f"message {i}: unknown role {shown(role)} (expected system, user or assistant)",
                "unknown role",
            )
        if not isinstance(content, str):
            what = "missing content" if content is None else f"content is {type(content).__name__}, not text"
            raise ChatError(f"message {i} ({role}): {what}", "missing content")
        spelled = spelled_special(content)
        if spelled and not (replies_as_text and role == "assistant"):
            raise ChatError(
                f"message {i} ({role}): the text contains the special token {spelled}", "special token text"
            )
        if role == "system" and i:
            raise ChatError(f"message {i}: a system message may only come first", "system not first")
        if role == "assistant" and i == (1 if messages[0]["role"] == "system" else 0):
            raise ChatError(f"message {i}: an assistant turn before any user message", "assistant first")


def render_with_mask(
    messages: Sequence[dict], add_generation_prompt: bool = False, replies_as_text: bool = False
) -> tuple[list[int], list[int]]:
    """The conversation's token ids and, aligned with them, 1 where training learns the token: the
    assistant's text and its end token; not the user's or system's, nor the tokens opening a turn."""
    check(messages, replies_as_text)
    enc = get_tokenizer()
    ids, mask = [EOT_ID], [0]
    for message in messages:
        start, end = ROLES[message["role"]]
        body = enc.encode_ordinary(message["content"]) + [TOKEN_IDS[end]]
        learned = int(message["role"] == "assistant")
        ids += [TOKEN_IDS[start], *body]
        mask += [0] + [learned] * len(body)
    if add_generation_prompt:
        ids.append(ASSISTANT_START_ID)
        mask.append(0)
    return ids, mask


def render(
    messages: Sequence[dict], add_generation_prompt: bool = False, replies_as_text: bool = False
) -> list[int]:
    """The token ids of a conversation; with `add_generation_prompt`, opened for the assistant's reply
    (what transformers' `apply_chat_template` gives with the exported template)."""
    return render_with_mask(messages, add_generation_prompt, replies_as_text)[0]


def render_text(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text with the special tokens spelled out (the template's output), for
    tools that take prompts as strings (lm-evaluation-harness); `encoding()` reads it back."""
    check(messages)
    text = EOT + "".join(ROLES[m["role"]][0] + m["content"] + ROLES[m["role"]][1] for m in messages)
    return text + (ASSISTANT_START if add_generation_prompt else "")


def decode(ids: Sequence[int]) -> str:
    """Text of token ids, chat tokens spelled out."""
    return encoding().decode(list(ids))
