"""GGUF export: one file that llama.cpp, Ollama and LM Studio load, written with the `gguf` package
(llama.cpp's own Python writer).

The layout is llama.cpp's `gpt2` architecture: its metadata keys, its tensor names (found through the
package's own table of Hugging Face names, so they follow llama.cpp), every matrix [out, in] as
nn.Linear keeps it (GGUF lists dimensions innermost first, so llama.cpp reads [in, out] as it
wants). The embedding is written once: llama.cpp's GPT-2 loader uses `token_embd` as the output
matrix when no `output` tensor is present, which is our tying. Padded vocabulary rows are dropped.
The tokenizer is GPT-2's byte-level BPE (tokens as `vocab.json` spells them, and the merges), with
`<|endoftext|>` and a chat model's chat tokens as control tokens; a chat model also carries our Jinja
template and `<|assistant_end|>` as its end-of-turn token, so llama.cpp's chat mode stops there."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..files.fsio import AtomicFile, check_space, remove_leftovers
from ..files.lock import DirLock
from ..model.gpt import GPT
from ..text import chat
from ..text.tokenizer import EOT_ID, get_tokenizer, hf_vocab_and_merges
from .hf import HFError, load_source

OUTTYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32  # q8_0 quantizes rows in blocks of 32 values; a matrix whose rows are not stays f16
TOKENIZER_BYTES = 4 << 20  # the vocabulary, merges and template: a few MB beside the weights


def _gguf():
    try:
        import gguf
    except ImportError:
        raise HFError("GGUF export needs the gguf package: pip install 'gpt2repro[hf]'") from None
    return gguf


def export_gguf(model: GPT, out: str | os.PathLike, outtype: str = "f32") -> Path:
    """Write `model` to the GGUF file `out` (f32, f16 or q8_0 matrices; vectors stay f32): complete or
    absent (`fsio.AtomicFile`), under the export lock beside it, refused before writing when the disk
    cannot hold it."""
    with _locked(Path(out), outtype):
        return _write(model, Path(out), outtype)


def export_gguf_source(source: str, out: str | os.PathLike, outtype: str = "f32", hf: bool = False) -> Path:
    """`export_gguf` of a run/checkpoint of ours (or, with `hf`, a Hugging Face GPT-2 directory),
    locking the output before the weights are read."""
    with _locked(Path(out), outtype):
        return _write(load_source(source, hf), Path(out), outtype)


def _refuse(out: Path, outtype: str) -> None:
    """A one-line error for an output that is not a new file in the directory named: checked before
    the lock is taken (its lock would land beside a device, or where a link points), and again under it."""
    if outtype not in OUTTYPES:
        raise UserError(f"outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    if out.is_symlink():
        raise HFError(f"{out}: is a symbolic link; name a new file in the directory to write into")
    if out.is_dir():
        raise HFError(f"{out}: is a directory; name the .gguf file to write")
    if out.exists():
        raise HFError(f"{out}: exists; choose a new file name")


def _locked(out: Path, outtype: str) -> DirLock:
    """The export lock beside `out`, in its directory (`out` itself is no link: refused first)."""
    _refuse(out, outtype)
    return DirLock(out, "export", beside=True)


def _write(model: GPT, out: Path, outtype: str) -> Path:
    _refuse(out, outtype)
    gguf = _gguf()
    remove_leftovers(out.parent, out.name)  # a killed earlier export's temporaries
    tensors = _tensors(model, outtype, gguf)
    needed = sum(a.nbytes for _, a, _ in tensors) + TOKENIZER_BYTES
    check_space(out, "the GGUF export", needed)
    with AtomicFile(out, "the GGUF export") as tmp:
        writer = gguf.GGUFWriter(tmp.tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
        _metadata(writer, model, _file_type(tensors), gguf)
        for name, array, raw_dtype in tensors:
            writer.add_tensor(name, array, raw_dtype=raw_dtype)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return out


def _file_type(tensors: list[tuple[str, np.ndarray, object]]) -> str:
    """What the file holds (not what was asked): q8_0 only if some matrix was quantized (rows of a
    multiple of 32), f16 if some matrix is f16, else all f32."""
    if any(raw is not None for _, _, raw in tensors):
        return "MOSTLY_Q8_0"
    return "MOSTLY_F16" if any(a.dtype == np.float16 for _, a, _ in tensors) else "ALL_F32"


def _metadata(writer, model: GPT, file_type: str, gguf) -> None:
    cfg = model.config
    writer.add_name("gpt2repro chat model" if cfg.chat else "gpt2repro model")
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    tokens, types, merges = vocabulary(cfg.vocab_size, gguf)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's GPT-2 pre-tokenizer regex
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(EOT_ID)
    writer.add_eos_token_id(EOT_ID)
    writer.add_add_bos_token(False)  # GPT-2 prompts start with their text, as `gpt2repro sample` does
    writer.add_add_eos_token(False)
    if cfg.chat:
        writer.add_eot_token_id(chat.ASSISTANT_END_ID)
        writer.add_chat_template(chat.CHAT_TEMPLATE)


def vocabulary(vocab_size: int, gguf) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id (`vocab.json`'s byte-level spelling), their types, and the BPE merges: GPT-2's
    50,257, then the chat tokens when the model has them; control tokens are the special ones."""
    vocab, merges = hf_vocab_and_merges(get_tokenizer())
    special = {EOT_ID: "<|endoftext|>"} | {i: t for t, i in chat.TOKEN_IDS.items() if i < vocab_size}
    by_id = {i: t for t, i in vocab.items()} | special
    if sorted(by_id) != list(range(vocab_size)):
        raise HFError(f"vocab_size {vocab_size}: not GPT-2's vocabulary (with or without the chat tokens)")
    tokens = [by_id[i] for i in range(vocab_size)]
    normal, control = int(gguf.TokenType.NORMAL), int(gguf.TokenType.CONTROL)
    return tokens, [control if i in special else normal for i in range(vocab_size)], merges


def _tensors(model: GPT, outtype: str, gguf) -> list[tuple[str, np.ndarray, object]]:
    """(GGUF name, data, raw type or None) for every weight: names from the package's map of
    Hugging Face GPT-2 names to llama.cpp's, the lm_head skipped (tied), padded rows dropped."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, model.config.n_layer)
    out = []
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # llama.cpp falls back to token_embd for the output
        data = value.detach().to("cpu", torch.float32)
        if key == "transformer.wte.weight":
            data = data[: model.config.vocab_size]
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise HFError(f"{key}: no GGUF name for this weight in llama.cpp's gpt2 architecture")
        kind = "f32" if name.startswith("position_embd") and outtype == "q8_0" else outtype
        out.append((name, *_encode(data.numpy(), kind, gguf)))  # llama.cpp never quantizes positions
    return out


def _encode(data: np.ndarray, outtype: str, gguf) -> tuple[np.ndarray, object]:
    """Vectors (norms, biases) stay f32, as llama.cpp's converter keeps them; matrices take the type."""
    if data.ndim == 1 or outtype == "f32":
        return np.ascontiguousarray(data), None
    if outtype == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data, q8), q8
    return data.astype(np.float16), None
