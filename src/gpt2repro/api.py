"""The Python API: a few stable names for notebooks and scripts, the calls the CLI itself makes.

import gpt2repro

llm = gpt2repro.load("runs/124m")   # a run or checkpoint of ours, an export, an HF GPT-2 directory, a hub id
print(llm.generate("Hello, I'm a language model,", max_new_tokens=32, seed=42))
llm.samples("Hello", n=4)           # four continuations, sample i drawn with seed + i (`gpt2repro sample`)
for piece in llm.stream("Once upon a time", max_new_tokens=64):
    print(piece, end="")
chat = gpt2repro.load("runs/chat").chat(system="You are concise.")
print(chat.reply("What is the capital of France?"))    # the conversation stays in the KV cache
llm.hellaswag(limit=500)            # {"n": 500, "acc": ..., "acc_norm": ...}
llm.export("hf/mine")               # transformers; llm.export("mine.gguf", format="gguf") for llama.cpp
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


@dataclass
class LLM:
    """A model loaded for use, prepared for decoding on this host (`generation.decoding.prepare`)."""

    model: object  # model.gpt.GPT: torch is imported only once a model is loaded
    source: str
    compiled: bool = False  # decode through compiled one-token steps (`load(..., compiled=True)`)

    def samples(
        self,
        prompt: str,
        n: int = 4,
        *,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_k: int | None = 50,
        top_p: float = 1.0,
        seed: int = 42,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
    ) -> list[str]:
        """`n` continuations of `prompt` (the prompt included), sample i drawn with seed + i, each
        ending at its first token that is not text: what `gpt2repro sample` prints. The penalties
        and `logit_bias` ({token id: -100..100}) as OpenAI's, over each sample's own tokens."""
        from .generation.generate import sample_text

        sampling = _sampling(temperature, top_k, top_p, seed, presence_penalty, frequency_penalty, logit_bias)
        return sample_text(self.model, prompt, n, max_new_tokens, sampling=sampling, compiled=self.compiled)

    def generate(self, prompt: str, *, max_new_tokens: int = 32, **sampling) -> str:
        """One continuation of `prompt`, the prompt included (`samples` with n=1; its keywords)."""
        return self.samples(prompt, 1, max_new_tokens=max_new_tokens, **sampling)[0]

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_k: int | None = 50,
        top_p: float = 1.0,
        seed: int = 42,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
    ) -> Iterator[str]:
        """The continuation of `prompt` as it is drawn, in pieces of text (a character split across
        tokens arrives whole); joined, the text `generate` returns after the prompt."""
        from .generation.generate import prompt_tokens, stream_tokens
        from .text.tokenizer import get_tokenizer
        from .text.tokentext import TextStream

        ids = prompt_tokens(prompt, self.model.config.block_size)
        text = TextStream(get_tokenizer().decode_single_token_bytes)
        sampling = _sampling(temperature, top_k, top_p, seed, presence_penalty, frequency_penalty, logit_bias)
        for token in stream_tokens(
            self.model, ids, max_new_tokens, sampling=sampling, compiled=self.compiled
        ):
            piece = text.feed(token)
            if piece:
                yield piece
        if tail := text.finish():
            yield tail

    def chat(self, *, system: str | None = None, max_new_tokens: int = 256, **sampling):
        """A conversation with a chat model held in the KV cache (`ChatSession`: `.reply(text)`,
        `.send(text)` for the reply's tokens as they come, `.reset()`); `sampling`: temperature,
        top_k, top_p, seed, presence_penalty, frequency_penalty, logit_bias (as `samples`)."""
        from .generation.chat_session import ChatSession

        return ChatSession(self.model, system, max_new_tokens, compiled=self.compiled, **sampling)

    def hellaswag(self, *, limit: int | None = None, style: str = "completion", batch_size: int = 32) -> dict:
        """HellaSwag validation ({n, acc, acc_norm}), scored as `gpt2repro eval hellaswag --style`."""
        from .evals import hellaswag

        device = next(self.model.parameters()).device
        return hellaswag.evaluate(
            self.model, hellaswag.load_examples(None, limit), style, device, batch_size=batch_size
        )

    def export(self, out: str | os.PathLike, *, format: str = "hf", outtype: str = "f32") -> Path:
        """A directory `transformers` loads (`hf`), or one GGUF file for llama.cpp (`gguf`: f32, f16, q8_0)."""
        if format == "gguf":
            from .interop.gguf_export import export_gguf

            return export_gguf(self.model, out, outtype)
        if format != "hf":
            raise UserError(f"format must be hf or gguf, got {format!r}")
        from .interop.hf import export_hf

        return export_hf(self.model, out)


def _sampling(temperature, top_k, top_p, seed, presence_penalty, frequency_penalty, logit_bias):
    from .generation.sampling import Sampling

    penalties = dict(presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    return Sampling.make(
        logit_bias, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, **penalties
    )


def load(
    source: str | os.PathLike,
    *,
    device: str = "auto",
    weight_dtype: str = "fp32",
    kind: str = "auto",
    compiled: bool = False,
) -> LLM:
    """A model to use: `kind` "checkpoint" (a run or checkpoint directory of ours), "hf" (an HF GPT-2
    directory, an export of ours, `gpt2` … `gpt2-xl` or OWNER/NAME[@REV] on the hub), or "auto" (a
    directory of ours if it is one, else as "hf"). In `weight_dtype` (fp32, bf16, fp16, or int8:
    weights rounded per output feature, decoded by the int8 kernel), on `device` (auto: cuda > mps >
    cpu), prepared for decoding: through one-token steps compiled whole if `compiled` (each compiled
    once per process and kind of batch, tens of seconds: faster on a CPU, where the Linear weights
    are then views of one buffer: `.clone()` them to save them with safetensors)."""
    from .generation.decoding import for_decoding
    from .parallel.distributed import pick_device

    where = pick_device(device)
    model = for_decoding(read_model(source, where, kind), weight_dtype, compiled)
    return LLM(model, str(source), compiled)


def read_model(source: str | os.PathLike, where, kind: str = "auto"):
    """The model `source` names (`kind` as `load` reads it) on the torch device `where`, TF32 set
    for it, not prepared for decoding: what `load` starts from, and what `eval` and `serve` read."""
    from .checkpoint.gathered import load_model
    from .interop.hf import load_hf, load_pretrained
    from .model.precision import enable_tf32

    if kind not in ("auto", "checkpoint", "hf"):
        raise UserError(f"kind must be auto, checkpoint or hf, got {kind!r}")
    enable_tf32(where)
    read = {"auto": load_pretrained, "checkpoint": lambda s: load_model(s, where), "hf": load_hf}[kind]
    return read(source).to(where)
