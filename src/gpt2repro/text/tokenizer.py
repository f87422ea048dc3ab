"""The GPT-2 BPE: tiktoken's `gpt2` encoding built from a checksummed local rank file, and the
Hugging Face `vocab.json` / `merges.txt` derived from the same ranks for exported checkpoints."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from ..files import assets

EOT = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257  # ids 0..50256; anything above is not a GPT-2 token
# The regex of tiktoken's r50k_base / gpt2 encodings (tiktoken_ext.openai_public.r50k_pat_str).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@functools.lru_cache(maxsize=4)
def get_tokenizer(rank_file: str | None = None) -> tiktoken.Encoding:
    """tiktoken's `gpt2` encoding, from `rank_file` or the `gpt2.tiktoken` asset (verified)."""
    path = (
        assets.verify(Path(rank_file), assets.REGISTRY["gpt2.tiktoken"])
        if rank_file
        else assets.fetch("gpt2.tiktoken")
    )
    ranks = load_tiktoken_bpe(os.fspath(path))
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT: EOT_ID},
        explicit_n_vocab=N_VOCAB,
    )


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map used by HF's byte-level BPE files."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _split(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The merge that produced `token`: run BPE on its bytes using only ranks below its own."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = None, limit
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best is None:
            raise ValueError(f"rank table is not a BPE merge table: cannot build {token!r}")
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts[0], parts[1]


def hf_vocab_and_merges(enc: tiktoken.Encoding) -> tuple[dict[str, int], list[str]]:
    ranks = enc._mergeable_ranks
    b2u = bytes_to_unicode()

    def show(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {show(tok): rank for tok, rank in ranks.items()}
    vocab[EOT] = EOT_ID
    merges = []
    for tok, _ in sorted(((t, r) for t, r in ranks.items() if len(t) > 1), key=lambda tr: tr[1]):
        a, b = _split(tok, ranks)
        merges.append(f"{show(a)} {show(b)}")
    return vocab, merges


def write_hf_tokenizer(
    out_dir: str | os.PathLike,
    model_max_length: int = 1024,
    special: dict[str, int] | None = None,
    chat_template: str | None = None,
) -> None:
    """vocab.json, merges.txt and tokenizer_config.json that `AutoTokenizer` loads with no network;
    a chat model's tokens (`special`, after <|endoftext|>) as special tokens, with its template."""
    out = Path(out_dir)
    vocab, merges = hf_vocab_and_merges(get_tokenizer())
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
    }
    if special:
        tokens = {EOT: EOT_ID, **special}
        config["added_tokens_decoder"] = {
            str(i): {
                "content": t,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for t, i in tokens.items()
        }
        config["additional_special_tokens"] = list(special)
    if chat_template:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: EOT for k in ("bos_token", "eos_token", "unk_token")})
    )
