"""Yardsticks for `gpt2repro bench`, each the plain way of doing what our code does faster:
nanoGPT's model as written in the lecture, Hugging Face's GPT2LMHeadModel, build-nanogpt's sampling
loop and its one-example-at-a-time HellaSwag loop. Nothing outside `bench` imports them."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config.schema import GPTConfig
from ..evals.hellaswag import render
from ..interop.hf import export_hf
from ..model.gpt import GPT
from ..model.precision import autocast


class RefBlock(nn.Module):
    """nanoGPT's block, as written in the lecture: no fused loss, nothing clever. Submodules are
    named like `model.Block`'s, so a state dict of ours loads as it is."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.h = h
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.ModuleDict(dict(c_attn=nn.Linear(d, 3 * d), c_proj=nn.Linear(d, d)))
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(d, 4 * d), c_proj=nn.Linear(4 * d, d)))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.attn.c_proj(y)
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class RefGPT(nn.Module):
    """The plain model: full logits, then F.cross_entropy over the padded vocabulary too."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                h=nn.ModuleList(RefBlock(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx, targets):
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in t.h:
            x = block(x)
        logits = self.lm_head(t.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


class HFWrapper(nn.Module):
    """transformers' GPT2LMHeadModel (SDPA attention, no dropout) behind our (idx, targets) call."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_cfg = GPT2Config(
            n_layer=cfg.n_layer,
            n_embd=cfg.n_embd,
            n_head=cfg.n_head,
            n_positions=cfg.block_size,
            vocab_size=cfg.padded_vocab_size,
            attn_pdrop=0.0,
            embd_pdrop=0.0,
            resid_pdrop=0.0,
            attn_implementation="sdpa",
        )
        self.model = GPT2LMHeadModel(hf_cfg)

    def forward(self, idx, targets):
        out = self.model(input_ids=idx, labels=targets)
        return out.logits, out.loss


def hf_copy(model: GPT):
    """The same weights as a transformers model, through our export."""
    from transformers import GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as d:
        out = export_hf(model, Path(d) / "m")
        return GPT2LMHeadModel.from_pretrained(out, attn_implementation="sdpa").eval()


def original_generate(model, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """build-nanogpt's sampling loop, greedy: the full forward over the whole sequence per token."""
    for _ in range(new_tokens):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def hellaswag_one_at_a_time(model, examples: list[dict], dtype: str = "fp32", device="cpu") -> list[int]:
    """The original build-nanogpt method: one example per forward, full logits, per-token losses
    (fp32 as in its hellaswag.py; bf16 autocast as in its training loop)."""
    preds = []
    for ex in examples:
        r = render(ex, "completion")
        rows = [r.context + e for e in r.endings]
        width = max(len(t) for t in rows)
        tokens = torch.zeros(4, width, dtype=torch.long)
        mask = torch.zeros(4, width)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row)
            mask[i, len(r.context) : len(row)] = 1
        tokens, mask = tokens.to(device), mask.to(device)
        with torch.no_grad(), autocast(torch.device(device), dtype):
            logits = model(tokens)[0]
        losses = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none"
        ).view(4, -1)
        shift_mask = mask[:, 1:]
        avg = (losses * shift_mask).sum(1) / shift_mask.sum(1)
        preds.append(int(avg.argmin()))
    return preds


@torch.no_grad()
def core_one_at_a_time(model: GPT, task, prepared: list, dtype: str = "fp32", device="cpu") -> list[bool]:
    """nanochat's CORE loop: one item per forward pass, its rows right-padded with BOS, the logits
    of every position, the loss and argmax read at the scored ones. Each item's verdict."""
    from ..evals.core import judge

    verdicts = []
    for p in prepared:
        width = max(len(r) for r in p.rows)
        idx = torch.full((len(p.rows), width), 50256, dtype=torch.long)
        for i, row in enumerate(p.rows):
            idx[i, : len(row)] = torch.tensor(row)
        idx = idx.to(device)
        with autocast(torch.device(device), dtype):
            logits = model(idx)[0].float()
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten(), reduction="none")
        losses, hits = losses.view(len(p.rows), -1), logits[:, :-1].argmax(-1) == idx[:, 1:]
        sums = [-losses[i, s - 1 : e - 1].sum().item() for i, (s, e) in enumerate(p.spans)]
        counts = [e - s for s, e in p.spans]
        hit = [bool(hits[i, s - 1 : e - 1].all()) for i, (s, e) in enumerate(p.spans)]
        verdicts.append(judge(task, p, sums, counts, hit)["correct"])
    return verdicts
