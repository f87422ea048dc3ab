"""Hugging Face interop: load `GPT2LMHeadModel` checkpoints (hub name or local directory) into our
model, and export ours to a directory that `transformers` loads with no network.

HF's GPT-2 uses Conv1D layers whose weights are stored [in, out]; ours are nn.Linear [out, in], so
those four weights are transposed each way. HF saves lm_head tied (omitted); padded vocab rows are
trimmed on export and added on load (padded as our presets are, so the rows the chat tokens take
exist without resizing). A chat model's export carries the chat tokens as special tokens, the chat
template and a generation config that stops at the end of the assistant's turn."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import gathered
from ..config.schema import ConfigError, GPTConfig
from ..errors import UserError
from ..files import hub
from ..files.download import brief
from ..files.fsio import AtomicDir, default_permissions, remove_leftovers
from ..files.lock import DirLock
from ..model.gpt import GPT, WeightsMismatch, load_state_strict
from ..text import chat
from ..text.tokenizer import EOT_ID, write_hf_tokenizer

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HUB_SPEC = re.compile(
    r"^(?:\w[\w.-]*/[\w.-]+|gpt2(?:-medium|-large|-xl)?)(?:@[\w./-]+)?$"
)  # OWNER/NAME[@REV]
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in older HF checkpoints
VOCAB_MULTIPLE = 64  # as our presets pad: 50257 -> 50304 rows
CHAT_KEY = "gpt2repro_chat"  # config.json of a chat export (transformers keeps unknown keys)


class HFError(UserError, RuntimeError):
    """A Hugging Face checkpoint could not be loaded or written; the message says what is wrong."""


def _hub_download(spec: str) -> Path:
    """The snapshot directory of a hub model (`OWNER/NAME[@REVISION]`, or `gpt2` … `gpt2-xl`) holding
    its config.json and weights, fetched through huggingface_hub's cache with retries and checked
    against the sha256s the hub lists; offline, only the cache is looked at."""
    name, _, revision = spec.partition("@")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise HFError(
            f"loading {name!r} from the hub needs huggingface_hub: pip install 'gpt2repro[hf]'"
        ) from None
    advice = "download it elsewhere and pass its local directory (config.json + model.safetensors) instead"
    why = hub.unreachable()
    try:
        if why and hub.offline():
            config = hub.cached_offline(name, "config.json", revision or None)
            return config.parent
        if why:
            raise HFError(f"could not fetch {name!r} from the Hugging Face hub ({why}); {advice}")
        listing = hub.list_files(name, "model", revision or None)
        weights = [w for w in ("model.safetensors", "pytorch_model.bin") if w in listing.files]
        if not weights or "config.json" not in listing.files:
            raise HFError(f"{spec}: no config.json with model.safetensors or pytorch_model.bin on the hub")
        config = hub.cached_file(listing, "config.json")
        hub.cached_file(listing, weights[0])
        return config.parent
    except UserError as e:
        raise HFError(str(e) if isinstance(e, HFError) else f"{spec}: {e}; {advice}") from None
    except Exception as e:  # noqa: BLE001 - no such repo, no access, a 404: all one line
        raise HFError(f"could not fetch {name!r} from the Hugging Face hub ({brief(e)}); {advice}") from None


def _read_state(directory: Path) -> dict[str, torch.Tensor]:
    st, binf = directory / "model.safetensors", directory / "pytorch_model.bin"
    try:
        if st.is_file():
            return load_file(st)
        if binf.is_file():
            return torch.load(binf, map_location="cpu", weights_only=True)  # never unpickle code
    except (SafetensorError, RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise HFError(
            f"{st if st.is_file() else binf}: corrupted or unreadable weights ({str(e).splitlines()[0]})"
        ) from None
    raise HFError(f"{directory}: no model.safetensors or pytorch_model.bin")


def load_pretrained(source: str | os.PathLike) -> GPT:
    """Weights to start from or evaluate: a run or checkpoint directory of ours, a Hugging Face
    GPT-2 directory (our exports included), or a hub model (`gpt2` ... `gpt2-xl`, OWNER/NAME[@REV])."""
    path = Path(source)
    ours = path.name == "checkpoints" or (path / "checkpoints").is_dir() or (path / "state.json").is_file()
    return gathered.load_model(path) if path.is_dir() and ours else load_hf(source)


def config_from_hf(hf: dict) -> GPTConfig:
    if hf.get("model_type", "gpt2") != "gpt2":
        raise HFError(f"config.json: a {hf['model_type']!r} model, not GPT-2 (model_type 'gpt2')")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise HFError(f"unsupported activation_function {act!r}: GPT-2 uses the tanh GELU (gelu_new)")
    try:
        return GPTConfig(
            block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            vocab_multiple=VOCAB_MULTIPLE,
            chat=hf.get(CHAT_KEY) is True,
        ).validate()
    except KeyError as e:
        raise HFError(f"config.json lacks the GPT-2 field {e.args[0]!r}") from None
    except ConfigError as e:  # checked before any weight is allocated
        raise HFError(f"config.json: {str(e).removeprefix('model.')}") from None


def load_hf(name_or_dir: str | os.PathLike) -> GPT:
    """A GPT from a local HF GPT-2 directory, or a hub model (`gpt2` ... `gpt2-xl`, OWNER/NAME[@REV])
    when not a directory."""
    directory = Path(name_or_dir)
    if not directory.is_dir():
        if not HUB_SPEC.match(str(name_or_dir)):
            raise HFError(
                f"{name_or_dir}: not a directory and not a hub name ({', '.join(HUB_NAMES)}, or OWNER/NAME[@REVISION])"
            )
        directory = _hub_download(str(name_or_dir))
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise HFError(f"{directory}: no config.json")
    try:
        config = config_from_hf(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError as e:
        raise HFError(f"{cfg_path}: not valid JSON ({e})") from None
    state = _read_state(directory)
    if not any(k.startswith("transformer.") for k in state):  # a bare GPT2Model
        state = {f"transformer.{k}": v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_BUFFERS)}
    state = {k: v.t() if k.endswith(CONV1D) else v for k, v in state.items()}
    if "transformer.wte.weight" in state:  # tied: lm_head is the embedding (HF saves it once)
        state["transformer.wte.weight"] = state["lm_head.weight"] = _pad_rows(
            state["transformer.wte.weight"], config
        )
    model = GPT(config)
    try:
        load_state_strict(model, state)
    except WeightsMismatch as e:
        raise HFError(f"{directory}: weights do not fit the model ({e})") from None
    return model


def _pad_rows(wte: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """The embedding with the padded rows our model has: zeros, never predicted nor read as input."""
    missing = config.padded_vocab_size - wte.size(0)
    if wte.size(0) != config.vocab_size or missing <= 0:
        return wte  # a mismatch is left for load_state_strict to name
    return torch.cat([wte, wte.new_zeros(missing, wte.size(1))])


def hf_config(config: GPTConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "attn_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "use_cache": True,
        "torch_dtype": "float32",
        **({CHAT_KEY: True} if config.chat else {}),
    }


def export_hf(model: GPT, out_dir: str | os.PathLike) -> Path:
    """Write config.json, model.safetensors (HF layout), generation_config.json and tokenizer files.

    The directory appears complete or not at all (`fsio.AtomicDir`), with normal permissions, written
    under its lock (`lock.DirLock`): a second export to the same place stops at once. An `out_dir`
    that is a symbolic link is exported through: the files appear in the directory it points to."""
    with DirLock(out_dir, "export", beside=True):
        return _export(model, Path(os.path.realpath(out_dir)))


def load_source(source: str | os.PathLike, hf: bool = False) -> GPT:
    """The model an export reads: a run or checkpoint directory of ours, or with `hf` a Hugging Face
    GPT-2 directory (or hub name)."""
    return load_hf(source) if hf else gathered.load_model(source)


def export_checkpoint(source: str | os.PathLike, out_dir: str | os.PathLike, hf: bool = False) -> Path:
    """`export_hf` of a checkpoint of ours (`load_source`), locking the output before the weights are read."""
    with DirLock(out_dir, "export", beside=True):
        return _export(load_source(source, hf), Path(os.path.realpath(out_dir)))


def _export(model: GPT, out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise HFError(f"{out}: exists and is not a directory; choose a new directory")
    if out.exists() and any(out.iterdir()):
        raise HFError(f"{out}: exists and is not empty; choose a new directory")
    remove_leftovers(out.parent, out.name)  # a killed earlier export's temporaries
    config = model.config
    state = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied to transformer.wte.weight, as HF saves it
        v = v.detach().to("cpu", torch.float32)
        if k == "transformer.wte.weight":
            v = v[: config.vocab_size]  # drop padded rows
        state[k] = (v.t() if k.endswith(CONV1D) else v).contiguous()
    needed = sum(v.numel() * v.element_size() for v in state.values())
    with AtomicDir(out, what="the export", needed=needed) as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        default_permissions(tmp / "model.safetensors")  # safetensors writes it 0600
        (tmp / "config.json").write_text(json.dumps(hf_config(config), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2))
        chat_files = dict(special=chat.TOKEN_IDS, chat_template=chat.CHAT_TEMPLATE) if config.chat else {}
        write_hf_tokenizer(tmp, model_max_length=config.block_size, **chat_files)
    return out


def generation_config(config: GPTConfig) -> dict:
    """Generation ends where every entry point of ours ends a reply (`sampling.ends_reply`): at
    <|endoftext|> and, for a chat model, at any chat token."""
    from ..generation.sampling import end_ids

    ends = end_ids(config.vocab_size)
    return {
        "bos_token_id": EOT_ID,
        "eos_token_id": ends if len(ends) > 1 else ends[0],
        "pad_token_id": EOT_ID,
        "do_sample": True,
    }
