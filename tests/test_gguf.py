"""`gpt2repro export --format gguf`: the file read back with the gguf package's reader (the layout
llama.cpp's gpt2 loader reads: its keys, tensor names and shapes, the vocabulary, a chat model's
template and end-of-turn token), and its bad inputs. llama.cpp itself runs the files in
test_gguf_llamacpp.py."""

from __future__ import annotations

import errno
import sys

import gguf
import numpy as np
import pytest
from helpers import assert_one_line_error, run_main
from test_disk_full import small_disk  # noqa: F401 - the fixture

from gpt2repro.checkpoint import gathered
from gpt2repro.files.lock import DirLock
from gpt2repro.text import chat
from gpt2repro.text.tokenizer import EOT_ID

LAYER_TENSORS = [
    f"{name}.{part}"
    for name in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
    for part in ("weight", "bias")
]


def _export(capsys, source, out, *extra):
    code, stdout, err = run_main(
        capsys, "export", "--checkpoint", source, "--out", out, "--format", "gguf", *extra
    )
    assert code == 0, err
    return gguf.GGUFReader(out)


def _value(reader, key):
    return reader.fields[key].contents()


def test_a_chat_model_exports_llama_cpps_gpt2_layout(chat_run_dir, tmp_path, capsys):
    model = gathered.load_model(chat_run_dir)
    cfg = model.config
    reader = _export(capsys, chat_run_dir, tmp_path / "chat.gguf")
    assert _value(reader, "general.architecture") == "gpt2"
    hparams = {k: _value(reader, f"gpt2.{k}") for k in ("block_count", "context_length", "embedding_length")}
    assert hparams == {
        "block_count": cfg.n_layer,
        "context_length": cfg.block_size,
        "embedding_length": cfg.n_embd,
    }
    assert _value(reader, "gpt2.feed_forward_length") == 4 * cfg.n_embd
    assert _value(reader, "gpt2.attention.head_count") == cfg.n_head
    assert _value(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(cfg.layer_norm_epsilon)
    assert _value(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32

    tokens = _value(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size == 50263  # the padded rows are not tokens
    assert tokens[EOT_ID] == "<|endoftext|>" and tokens[EOT_ID + 1 :] == list(chat.CHAT_TOKENS)
    assert tokens[:3] == ["!", '"', "#"] and tokens[220] == "Ġ" and tokens[1212] == "This"
    types = np.array(_value(reader, "tokenizer.ggml.token_type"))
    control = np.flatnonzero(types == gguf.TokenType.CONTROL)
    assert control.tolist() == list(range(EOT_ID, 50263))
    assert (np.delete(types, control) == gguf.TokenType.NORMAL).all()
    merges = _value(reader, "tokenizer.ggml.merges")
    assert len(merges) == 50000 and merges[0] == "Ġ t"
    assert (
        _value(reader, "tokenizer.ggml.model") == "gpt2" and _value(reader, "tokenizer.ggml.pre") == "gpt-2"
    )
    assert (
        _value(reader, "tokenizer.ggml.bos_token_id")
        == _value(reader, "tokenizer.ggml.eos_token_id")
        == EOT_ID
    )
    assert _value(reader, "tokenizer.ggml.eot_token_id") == chat.ASSISTANT_END_ID
    assert _value(reader, "tokenizer.ggml.add_bos_token") is False
    assert _value(reader, "tokenizer.chat_template") == chat.CHAT_TEMPLATE

    tensors = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias"}
    expected |= {f"blk.{i}.{name}" for i in range(cfg.n_layer) for name in LAYER_TENSORS}
    assert set(tensors) == expected  # no output.weight: llama.cpp reuses token_embd (tied)
    state = model.state_dict()
    embd = tensors["token_embd.weight"]
    assert embd.shape.tolist() == [cfg.n_embd, 50263]  # innermost first: [vocab, n_embd] rows
    np.testing.assert_array_equal(embd.data, state["transformer.wte.weight"][:50263].numpy())
    qkv = tensors["blk.1.attn_qkv.weight"]
    assert qkv.shape.tolist() == [cfg.n_embd, 3 * cfg.n_embd]  # nn.Linear's [out, in], as llama.cpp's wqkv
    np.testing.assert_array_equal(qkv.data, state["transformer.h.1.attn.c_attn.weight"].numpy())
    np.testing.assert_array_equal(
        tensors["blk.0.ffn_down.bias"].data, state["transformer.h.0.mlp.c_proj.bias"]
    )


@pytest.mark.parametrize("outtype, matrix_type", [("f16", "F16"), ("q8_0", "Q8_0")])
def test_a_base_model_in_f16_and_q8_0(run_dir, tmp_path, capsys, outtype, matrix_type):
    reader = _export(capsys, run_dir, tmp_path / f"{outtype}.gguf", "--outtype", outtype)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {v for k, v in types.items() if k.endswith(("qkv.weight", "up.weight", "token_embd.weight"))} == {
        matrix_type
    }
    assert {v for k, v in types.items() if k.endswith((".bias", "norm.weight"))} == {"F32"}
    assert types["position_embd.weight"] == {"f16": "F16", "q8_0": "F32"}[outtype]  # as llama.cpp quantizes
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    assert _value(reader, "general.file_type") == file_type
    assert len(_value(reader, "tokenizer.ggml.tokens")) == 50257
    assert (
        "tokenizer.chat_template" not in reader.fields and "tokenizer.ggml.eot_token_id" not in reader.fields
    )


def test_bad_gguf_exports_are_one_line_errors(run_dir, tmp_path, capsys, monkeypatch):
    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"mine")
    argv = ["export", "--checkpoint", run_dir, "--format", "gguf", "--out"]
    assert_one_line_error(capsys, [*argv, taken], "taken.gguf: exists; choose a new file name")
    assert taken.read_bytes() == b"mine"
    assert_one_line_error(capsys, [*argv, tmp_path], "is a directory; name the .gguf file to write")
    hf_args = ["export", "--checkpoint", run_dir, "--out", tmp_path / "hf", "--outtype", "f16"]
    assert_one_line_error(capsys, hf_args, "--outtype applies to --format gguf only")
    missing = ["export", "--hf", tmp_path / "nowhere", "--format", "gguf", "--out", tmp_path / "m.gguf"]
    assert_one_line_error(capsys, missing, "not a directory and not a hub name")
    with DirLock(tmp_path / "busy.gguf", "export", beside=True):
        assert_one_line_error(capsys, [*argv, tmp_path / "busy.gguf"], "busy.gguf is being written by")
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert_one_line_error(capsys, [*argv, tmp_path / "n.gguf"], "needs the gguf package: pip install")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]  # nothing else written or left


def test_a_full_disk_during_a_gguf_export(run_dir, tmp_path, capsys, monkeypatch):
    def full(self, *args, **kwargs):
        self.fout[0].write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    argv = ["export", "--checkpoint", run_dir, "--format", "gguf", "--out", tmp_path / "m.gguf"]
    assert_one_line_error(capsys, argv, "m.gguf: cannot write the GGUF export: no space left on device (")
    assert list(tmp_path.iterdir()) == []  # no file, temporary or lock left


def test_a_gguf_export_to_a_real_small_disk(run_dir, small_disk, capsys):  # noqa: F811
    disk = small_disk(4)
    argv = ["export", "--checkpoint", run_dir, "--format", "gguf", "--out", disk / "m.gguf"]
    assert_one_line_error(capsys, argv, "m.gguf: cannot write the GGUF export: not enough free space (")
    assert list(disk.iterdir()) == []


def test_the_llama_cpp_baseline_errors(capsys, monkeypatch):
    train = ["bench", "train", "--size", "4x256", "--baseline", "llama.cpp"]
    assert_one_line_error(capsys, train, "--baseline llama.cpp is a decoding baseline")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    generate = ["bench", "generate", "--size", "4x256", "--baseline", "llama.cpp", "--device", "cpu"]
    assert_one_line_error(capsys, generate, "needs llama-cpp-python: pip install 'gpt2repro[gguf-check]'")


def test_a_refused_gguf_output_takes_no_lock_outside_the_directory_named(
    run_dir, tmp_path, capsys, monkeypatch
):
    """/dev/null, or a link to a file elsewhere (there or not): refused before any lock, so nothing
    is created, even for a moment, beside what the link or the device points at."""
    taken = []
    monkeypatch.setattr(DirLock, "acquire", lambda self: (taken.append(self.path), self)[1])
    monkeypatch.setattr(DirLock, "release", lambda self: None)
    named, elsewhere = tmp_path / "named", tmp_path / "elsewhere"
    named.mkdir()
    elsewhere.mkdir()
    (elsewhere / "taken.gguf").write_bytes(b"theirs")
    (named / "to_new.gguf").symlink_to(elsewhere / "new.gguf")
    (named / "to_taken.gguf").symlink_to(elsewhere / "taken.gguf")
    argv = ["export", "--checkpoint", run_dir, "--format", "gguf", "--out"]
    assert_one_line_error(capsys, [*argv, "/dev/null"], "/dev/null: exists")
    assert_one_line_error(capsys, [*argv, named / "to_new.gguf"], "to_new.gguf: is a symbolic link")
    assert_one_line_error(capsys, [*argv, named / "to_taken.gguf"], "to_taken.gguf: is a symbolic link")
    assert taken == [] and sorted(p.name for p in elsewhere.iterdir()) == ["taken.gguf"]
    _export(capsys, run_dir, named / "mine.gguf")
    assert taken == [named.resolve() / ".mine.gguf.lock"]  # beside the file, in the directory named


def test_the_file_type_says_what_the_file_holds(tmp_path):
    """q8_0 asked of a model whose rows are too short to quantize: every matrix stays f16, and the
    header says so (MOSTLY_F16), not MOSTLY_Q8_0."""
    import torch

    from gpt2repro.config.schema import model_config
    from gpt2repro.interop.gguf_export import export_gguf
    from gpt2repro.model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(model_config("tiny", n_embd=2, n_head=1, n_layer=1))
    reader = gguf.GGUFReader(export_gguf(model, tmp_path / "narrow.gguf", "q8_0"))
    assert {t.tensor_type.name for t in reader.tensors if t.name.endswith("qkv.weight")} == {"F16"}
    assert not any(t.tensor_type.name == "Q8_0" for t in reader.tensors)
    assert _value(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
