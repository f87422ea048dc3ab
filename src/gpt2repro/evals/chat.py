"""`gpt2repro eval chat`: how a chat model does on held-out conversations (the val split of a
`prepare --chat` directory).

- the assistant-token loss: the cross-entropy over the tokens SFT learns (the assistant's text and
  its end token) of the held-out rows, summed and divided by their number;
- template adherence: of the conversations' first assistant turns, the share whose greedy reply ends
  with the end-of-turn token within N tokens (not running on, not closing the turn another way).
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.conversations import data_seq_len
from ..data.loader import DataLoader
from ..data.shards import ShardError, conversation_spans, find_shards, read_shard
from ..errors import UserError
from ..generation.chat_session import greedy_reply, require_chat_model
from ..model.gpt import GPT
from ..text import chat


def _seq_len(data_dir) -> int:
    seq_len = data_seq_len(data_dir)
    if seq_len is None:
        raise ShardError(f"{data_dir}: not conversation data (prepare it with `gpt2repro prepare --chat`)")
    return seq_len


def conversations(data_dir, split: str = "val") -> list[list[int]]:
    """The conversations of a split, as token ids, where the packer recorded them (its spans files)."""
    _seq_len(data_dir)  # refuses data that is not conversations
    out = []
    for shard, spans in conversation_spans(data_dir, split):
        tokens = read_shard(shard)
        out += [np.asarray(tokens[offset : offset + length]).tolist() for offset, length in spans]
    return out


class ChatEvalError(UserError, ValueError):
    """A bad `eval chat` argument; one line."""


@torch.no_grad()
def assistant_loss(model: GPT, data_dir, batch_size: int) -> tuple[float, int, int]:
    """(loss over the learned tokens, how many, rows read) of the val split."""
    seq_len = _seq_len(data_dir)
    rows = max((len(read_shard(s)) - 1) // seq_len for s in find_shards(data_dir, "val"))
    batch_size = min(batch_size, rows)  # a small val split is still read whole
    device = next(model.parameters()).device
    loader = DataLoader(data_dir, "val", batch_size, seq_len, device=device, masks=True)
    total, learned = 0.0, 0
    for _ in range(loader.steps_per_epoch):
        x, y = loader.next_batch()
        total += float(model(x, y, reduction="sum")[1])
        learned += int((y >= 0).sum())
    return total / max(learned, 1), learned, loader.steps_per_epoch * batch_size


def adherence(model: GPT, held_out: list[list[int]], max_new_tokens: int) -> tuple[int, int]:
    """(replies that ended with the end-of-turn token within max_new_tokens, replies tried)."""
    ended = tried = 0
    for conversation in held_out:  # each has an assistant turn (the packer's rule)
        prompt = conversation[: conversation.index(chat.ASSISTANT_START_ID) + 1]
        if len(prompt) >= model.config.block_size:
            continue
        ended += greedy_reply(model, prompt, max_new_tokens)[1] == chat.ASSISTANT_END_ID  # not any end
        tried += 1
    return ended, tried


def evaluate(model: GPT, data_dir, limit: int = 100, max_new_tokens: int = 64, batch_size: int = 8) -> dict:
    """Assistant-token loss over held-out rows and template adherence over `limit` conversations."""
    require_chat_model(model)
    if min(limit, max_new_tokens, batch_size) < 1:
        raise ChatEvalError(
            f"--limit, --max-new-tokens and --batch-size must be at least 1 (got {limit}, {max_new_tokens}, {batch_size})"
        )
    seq_len, block = _seq_len(data_dir), model.config.block_size
    if seq_len > block:  # checked before any row is read, not by the model half way
        raise ChatEvalError(
            f"{data_dir} holds rows of {seq_len} tokens; this model reads at most {block} "
            f"(model.block_size): prepare the conversations again with --seq-len {block}"
        )
    # read first: data too old to say where its conversations lie is refused before the loss pass
    held_out = conversations(data_dir)[:limit]
    model.eval()
    loss, learned, rows = assistant_loss(model, data_dir, batch_size)
    ended, tried = adherence(model, held_out, max_new_tokens)
    return dict(
        loss=loss,
        learned_tokens=learned,
        rows=rows,
        adherence=ended / tried if tried else float("nan"),
        replies=tried,
        ended=ended,
        max_new_tokens=max_new_tokens,
    )


def summary(result: dict) -> str:
    return (
        f"chat: assistant-token loss {result['loss']:.4f} over {result['learned_tokens']:,} tokens of "
        f"{result['rows']} held-out rows | template adherence {result['ended']}/{result['replies']} = "
        f"{result['adherence']:.3f} (greedy replies ending their turn within {result['max_new_tokens']} tokens)"
    )
