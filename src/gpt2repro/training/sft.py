"""Supervised fine-tuning on conversations: `gpt2repro train --preset sft --data DIR init_from=...`.

`SFTTrainer` is the `Trainer` with three changes; everything else (DDP/FSDP, compile, autocast,
resume, the divergence guard, checkpoints) is the pretraining loop's.

- The loss of a step is the mean over every learned token of the global batch (the loader's masks:
  the assistant's tokens). Micro-batches and ranks hold different numbers of them, so a mean of
  per-micro-batch or per-rank means would weigh tokens unequally: the step first counts the learned
  tokens of all its micro-batches on all ranks, and each micro-batch adds its loss sum divided by
  that count (times the world size, which DDP's and FSDP's gradient averaging divides by again).
- Validation is the loss over the learned tokens of the held-out rows, summed then divided.
- The in-loop samples answer a few fixed prompts through the chat template.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config.schema import ConfigError, TrainConfig
from ..data.conversations import data_seq_len
from ..generation.chat_session import ChatSession
from ..model.precision import autocast
from ..parallel.distributed import all_reduce_sum
from .plan import Plan
from .train import MicroBatches, Trainer, TrainingError
from .train import train as _train

# The in-loop samples answer sample_prompt and then these, sample_count in all.
CHAT_PROMPTS = ("What is the capital of France?", "Tell me about the sea.", "Write a short poem about rain.")


class SFTTrainer(Trainer):
    """The training loop on conversation rows with loss masks (`prepare --chat`)."""

    def __init__(self, plan: Plan, data_dir: Path, run_dir: Path):
        cfg = plan.cfg
        seq_len = data_seq_len(data_dir)
        if seq_len is None:
            raise TrainingError(
                f"{data_dir}: not conversation data; prepare it with `gpt2repro prepare --chat`"
            )
        if seq_len != cfg.seq_len:
            raise TrainingError(
                f"{data_dir} holds rows of {seq_len} tokens but seq_len={cfg.seq_len}: set seq_len={seq_len}, "
                f"or prepare again with --seq-len {cfg.seq_len}"
            )
        if not cfg.model.chat:
            raise ConfigError(
                "fine-tuning on conversations needs a chat model: model.chat=true", "model.chat"
            )
        super().__init__(plan, data_dir, run_dir)

    def _loader(self, data_dir: Path, split: str, **kw):
        return super()._loader(data_dir, split, masks=True, **kw)

    def micro_batches(self) -> MicroBatches:
        """The step's micro-batches, all read first: each one's summed loss is divided by the number
        of learned tokens over all of them on all ranks, over the world size (gradient averaging
        over ranks divides by it again)."""
        batches = [self.train_loader.next_batch() for _ in range(self.plan.accum)]
        (learned,) = all_reduce_sum([sum(int((y >= 0).sum()) for _, y in batches)], self.device)
        if not learned:
            raise TrainingError("a step without a single learned token: the data's masks are empty")
        return MicroBatches(batches, "sum", learned / self.info.world_size)

    @torch.no_grad()
    def validation_loss(self) -> float:
        """The loss over the learned tokens of the first val_steps batches of held-out rows."""
        self.model.eval()
        self.val_loader.reset()
        total, learned = torch.zeros((), device=self.device, dtype=torch.float64), 0
        for _ in range(self.cfg.val_steps):
            x, y = self.val_loader.next_batch()
            with autocast(self.device, self.plan.dtype):
                _, loss = self.model(x, y, reduction="sum")
            total += loss.detach().double()
            learned += int((y >= 0).sum())
        total, learned = all_reduce_sum([float(total), learned], self.device)
        return total / max(learned, 1)

    def samples(self) -> list[str]:
        """Replies to sample_prompt and the fixed prompts, through the chat template."""
        cfg = self.cfg
        texts = []
        for prompt in (cfg.sample_prompt, *CHAT_PROMPTS)[: cfg.sample_count]:
            # one seed on every rank: under FSDP each forward pass is a collective, so every rank must
            # draw the same reply, of the same length (a rank that stopped first would leave the rest waiting)
            session = ChatSession(self.raw, max_new_tokens=cfg.sample_tokens, seed=42)
            texts.append(f"[user] {prompt}\n[assistant] {session.reply(prompt)}")
        return texts


def train(cfg: TrainConfig, data_dir: str | Path, run_dir: str | Path) -> dict:
    """Fine-tune on conversations (or resume); returns a summary of the last step."""
    return _train(cfg, data_dir, run_dir, trainer=SFTTrainer)
