"""GPT-2, readable in one file.

Parameter names are exactly the Hugging Face `GPT2LMHeadModel` state-dict keys so checkpoints move
both ways (HF stores the Conv1D weights transposed; `hf.py` handles that). The lm_head shares storage
with the token embedding. The embedding may be padded past the real vocabulary for faster matmuls;
padded ids are cut from the logits, so they are never predicted, sampled or scored. How fast it
decodes is not its concern: `generation/decoding.py` runs the same arithmetic one token at a time,
tested against this forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ..config.schema import GPTConfig
from .kvcache import KVCache
from .ops import linear_cross_entropy


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.n_head = config.n_head
        self.layer = layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True  # init scaled by (2*n_layer)^-0.5

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape  # batch, sequence length, embedding dimensionality (n_embd)
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        nh, hs = self.n_head, C // self.n_head  # heads, head size
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if mask is not None:  # an explicit (B, 1, T, T) mask, e.g. packed sequences
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash kernel where available
        else:  # keys/values (B, nh, cached + T, hs); a prompt from the start is plainly causal
            k, v, mask, causal = cache.insert(self.layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))  # heads side by side again


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, mask)
        return x + self.mlp(self.ln_2(x))


class WeightsMismatch(ValueError):
    """A state dict does not fit the model; the message lists every missing, unexpected and
    mis-shaped key. Callers (checkpoints, HF loading) wrap it in their own error naming the file."""


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into `model`, or raise WeightsMismatch before changing anything."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = [("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)]
    if any(items for _, items in problems):
        raise WeightsMismatch(
            "; ".join(
                f"{what}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                for what, items in problems
                if items
            )
        )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k])


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config.validate()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one tensor, one gradient
        # activation checkpointing: every n-th block is recomputed in backward (0: off). A training
        # setting, not architecture (memory for time, never the result): set where the run's model is built (`parallelize`, `distributed.wrap_model`).
        self.recompute_interval = 0
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = (
                0.02 * (2 * self.config.n_layer) ** -0.5 if getattr(module, "RESIDUAL_SCALE", False) else 0.02
            )
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def copy_weights_from(self, other: GPT) -> None:
        """Start from `other`'s weights (same architecture; the vocabulary may be padded otherwise,
        and may lack tokens this one has: the chat tokens, when a base model becomes a chat model).
        The rows both vocabularies hold are copied. A row `other` lacks starts at the mean of the
        copied rows plus its own initialisation (N(0, 0.02)): predicted about as likely as an average
        token at first, so the first steps see no huge loss, and told apart from the other new rows.
        Padded rows keep their initialisation."""
        load_state_strict(self, self.weights_from(other, self.transformer.wte.weight))

    def weights_from(self, other: GPT, wte: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state `copy_weights_from` loads, given this model's initial token embedding `wte`
        (whole: a sharded model gathers it first)."""
        state = other.state_dict()
        wte = wte.detach().clone()
        vocab = self.config.vocab_size
        source = state["transformer.wte.weight"].to(wte.device)
        shared = min(vocab, other.config.vocab_size, source.size(0))
        wte[:shared] = source[:shared]
        if shared < vocab:
            wte[shared:vocab] += source[:shared].mean(0)
        state["transformer.wte.weight"] = state["lm_head.weight"] = wte
        return state

    def num_params(self) -> int:
        """Unique parameters (the tied lm_head counted once), as published for GPT-2."""
        return sum(p.numel() for p in self.parameters())

    def hidden(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, T, n_embd) of tokens from position 0; with a `cache`,
        of new tokens after each slot's cached ones; or, for packed sequences, at explicit
        `positions` (B, T) with an attention `mask` (B, 1, T, T)."""
        T = idx.size(1)
        if cache is not None:  # (checks its own room)
            positions = cache.begin(T, idx.device)
        else:
            last = T if positions is None else int(positions.max()) + 1
            if last > self.config.block_size:
                raise ValueError(
                    f"sequence of {last} tokens exceeds block_size={self.config.block_size}; crop the input"
                )
            if positions is None:
                positions = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)
        every = self.recompute_interval if torch.is_grad_enabled() and cache is None else 0
        for i, block in enumerate(self.transformer.h):
            if every and i % every == 0:  # recomputed in backward instead of keeping activations
                x = torch.utils.checkpoint.checkpoint(block, x, None, mask, use_reentrant=False)
            else:
                x = block(x, cache, mask)
        if cache is not None:
            cache.advance()
        return self.transformer.ln_f(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary only: padded rows of the embedding are never predicted."""
        return self.lm_head(h)[..., : self.config.vocab_size]

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits, None) without targets; (None, cross-entropy) with them: the mean, or with
        reduction="sum" the sum over targets >= 0 (-1: a token not learned). Training never
        materialises the (B, T, vocab) logits: see `linear_cross_entropy`."""
        h = self.hidden(idx)
        if targets is None:
            return self.logits(h), None
        return None, linear_cross_entropy(
            h.flatten(0, 1),
            self.lm_head.weight,
            targets.flatten(),
            self.config.vocab_size,
            reduction=reduction,
        )

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N plus attention, as in the PaLM appendix."""
        cfg = self.config
        n = self.num_params() - self.transformer.wpe.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq_len
