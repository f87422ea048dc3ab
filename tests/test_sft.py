"""SFT: the masked loss against float64, the loss of a step as the mean over every learned token of
the global batch (1 and 2 ranks), fine-tunes of the tiny HF checkpoint and of an export of ours,
validation and samples through the template, exact resume, and the errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import losses, run_to_end, small_cfg

from conftest import CHAT_SMALL, shared_file
from gpt2repro.checkpoint import gathered
from gpt2repro.config.presets import train_config
from gpt2repro.config.schema import ConfigError
from gpt2repro.data.shards import ShardError
from gpt2repro.interop.hf import export_hf
from gpt2repro.model.ops import _recomputed_cross_entropy, linear_cross_entropy
from gpt2repro.parallel.distributed import DistInfo
from gpt2repro.training import sft
from gpt2repro.training import train as tr
from gpt2repro.training.plan import resolve

CPU = DistInfo(0, 0, 1, torch.device("cpu"))


def masked_reference(h, w, t, vocab):
    """Float64 cross-entropy summed over the targets >= 0."""
    return F.cross_entropy(h.double() @ w.double()[:vocab].t(), t, ignore_index=-1, reduction="sum")


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_masked_fused_loss_matches_float64(chunk):
    torch.manual_seed(0)
    h = torch.randn(150, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(70, 16, dtype=torch.float64, requires_grad=True)  # 64 classes + 6 padded rows
    t = torch.randint(0, 64, (150,))
    t[torch.rand(150) < 0.6] = -1  # most rows not learned, unevenly across the chunks
    t[:7] = -1  # a whole chunk ignored (chunk=7)
    loss = linear_cross_entropy(h, w, t, 64, chunk=chunk, reduction="sum")
    (0.3 * loss).backward()
    got = (loss.detach(), h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    ref = masked_reference(h, w, t, 64)
    (0.3 * ref).backward()
    torch.testing.assert_close(got[0], ref.detach(), rtol=0, atol=1e-11)
    torch.testing.assert_close(got[1], h.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[2], w.grad, rtol=0, atol=1e-12)
    assert torch.all(got[1][t < 0] == 0) and torch.all(got[2][64:] == 0)
    with torch.no_grad():  # validation: the loss alone
        assert linear_cross_entropy(h, w, t, 64, chunk=chunk, reduction="sum").item() == pytest.approx(
            ref.item()
        )


def test_masked_fp32_and_fp16_paths_match_float64():
    torch.manual_seed(1)
    h = torch.randn(96, 32, requires_grad=True)
    w = (torch.randn(70, 32) * 0.3).requires_grad_()
    t = torch.randint(0, 64, (96,))
    t[::3] = -1
    ref = masked_reference(h, w, t, 64)
    fp32 = linear_cross_entropy(h, w, t, 64, chunk=40, reduction="sum")
    assert fp32.item() == pytest.approx(ref.item(), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.float16):
        fp16 = _recomputed_cross_entropy(h, w, t, 64, chunk=40, masked=True)
        fused_entry = linear_cross_entropy(h, w, t, 64, chunk=40, reduction="sum")
    assert fp16.item() == pytest.approx(ref.item(), rel=3e-3) and fused_entry.item() == fp16.item()
    fp16.backward()
    assert torch.all(h.grad[t < 0] == 0)
    with pytest.raises(ValueError, match="reduction='none'"):
        linear_cross_entropy(h, w, t, 64, reduction="none")


def test_the_sum_of_a_fully_learned_batch_is_n_times_its_mean():
    torch.manual_seed(2)
    h, w, t = (
        torch.randn(50, 8, dtype=torch.float64),
        torch.randn(70, 8, dtype=torch.float64),
        torch.randint(0, 64, (50,)),
    )
    mean = linear_cross_entropy(h, w, t, 64)
    assert linear_cross_entropy(h, w, t, 64, reduction="sum").item() == pytest.approx(
        50 * mean.item(), rel=1e-12
    )


def sft_cfg(*extra):
    return train_config("cpu-tiny", ["model.chat=true", *CHAT_SMALL, "max_lr=1e-3", *extra])


def test_a_step_is_the_mean_over_every_learned_token_of_the_global_batch(chat_data_dir, tmp_path):
    cfg = sft_cfg("micro_batch_size=2", "total_batch_size=256", "seed=3")
    trainer = sft.SFTTrainer(resolve(cfg, CPU), chat_data_dir, tmp_path)
    assert trainer.plan.accum == 2
    batches = [trainer.train_loader.next_batch() for _ in range(2)]
    trainer.train_loader.reset()
    counts = [int((y >= 0).sum()) for _, y in batches]
    assert counts[0] != counts[1]  # uneven masks: a mean of the micro-batch means would differ
    x, y = (torch.cat(parts) for parts in zip(*batches))
    model = trainer.raw

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    big = model(x, y, reduction="sum")[1] / sum(counts)
    want = grads(big)
    naive = grads(sum(model(a, b, reduction="sum")[1] / (c * 2) for (a, b), c in zip(batches, counts)))
    loss = trainer.forward_backward()
    assert loss == pytest.approx(big.item(), rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7)
    with pytest.raises(AssertionError):  # the mean of micro-batch means weighs tokens unequally
        torch.testing.assert_close(
            naive["transformer.wte.weight"], want["transformer.wte.weight"], rtol=1e-5, atol=1e-7
        )


def test_a_steps_micro_batches_come_with_how_their_losses_make_the_step(chat_data_dir, data_dir, tmp_path):
    """What forward_backward needs of a step is what micro_batches() returns, not state left on the
    trainer: SFT's summed losses over the step's learned tokens, pretraining's means over accum."""
    cfg = sft_cfg("micro_batch_size=2", "total_batch_size=256")
    trainer = sft.SFTTrainer(resolve(cfg, CPU), chat_data_dir, tmp_path / "sft")
    step = trainer.micro_batches()
    learned = sum(int((y >= 0).sum()) for _, y in step.batches)
    assert len(step.batches) == trainer.plan.accum == 2
    assert step.reduction == "sum" and step.divisor == learned < 2 * 2 * 64
    pretrain = tr.Trainer(resolve(small_cfg(), CPU), data_dir, tmp_path / "pretrain")
    step = pretrain.micro_batches()
    assert (step.reduction, step.divisor) == ("mean", pretrain.plan.accum)
    assert len(list(step.batches)) == pretrain.plan.accum
    for t in (trainer, pretrain):
        t.forward_backward()
        assert not {"divisor", "reduction"} & (set(vars(t)) | set(dir(type(t))))


def _two_rank_common(chat_data_dir) -> list[str]:
    common = ["train", "--preset", "cpu-tiny", "--data", str(chat_data_dir), "model.chat=true", *CHAT_SMALL]
    return [*common, "micro_batch_size=2", "max_steps=3", "shuffle=true", "val_every=2", "ckpt_every=3"]


@pytest.fixture(scope="module")
def one_sft_process(chat_data_dir, tmp_path_factory):
    """The one-process run both two-rank modes are compared with (run once for both)."""
    out = tmp_path_factory.mktemp("one")
    # val_steps=4: the windows the two ranks read, two each
    run_to_end([*_two_rank_common(chat_data_dir), "--out", str(out), "val_steps=4"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp=false", "fsdp=true"])
def test_two_ranks_take_the_step_of_one_process(chat_data_dir, tmp_path, mode, one_sft_process):
    common = _two_rank_common(chat_data_dir)
    run_to_end([*common, "--out", str(tmp_path / "two"), "val_steps=2", mode], nproc=2)  # DDP or FSDP2
    one, two = losses(one_sft_process), losses(tmp_path / "two")
    assert one.keys() == two.keys() == {0, 1, 2}
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)
    val = [
        [
            r["loss"]
            for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
            if r["event"] == "val"
        ]
        for d in (one_sft_process, tmp_path / "two")
    ]
    assert val[1] == pytest.approx(val[0], rel=1e-5) and len(val[0]) == 3  # steps 0, 2 and 3


def test_validation_is_the_loss_over_held_out_learned_tokens(chat_data_dir, tmp_path):
    trainer = sft.SFTTrainer(resolve(sft_cfg("val_every=1", "val_steps=3"), CPU), chat_data_dir, tmp_path)
    total, learned = 0.0, 0
    loader = trainer.val_loader
    loader.reset()
    with torch.no_grad():
        for _ in range(3):
            x, y = loader.next_batch()
            logits = trainer.raw(x)[0].double()
            total += float(
                F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
            )
            learned += int((y >= 0).sum())
    assert trainer.validation_loss() == pytest.approx(total / learned, rel=1e-6)


def test_sft_of_the_tiny_hf_checkpoint_validates_samples_and_resumes(chat_data_dir, tmp_path):
    tiny = shared_file("tiny-gpt2")
    args = [f"init_from={tiny}", *CHAT_SMALL[4:], "ckpt_every=2", "warmup_steps=10"]  # the LR: max_steps' own
    cfg = train_config("sft", [*args, "max_steps=4"])
    cfg.val_every, cfg.val_steps, cfg.sample_every, cfg.sample_tokens = 2, 2, 4, 4
    summary = sft.train(cfg, chat_data_dir, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["chat"] and saved["model"]["vocab_size"] == 50263 and saved["model"]["n_embd"] == 2
    val = [
        r["loss"]
        for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        if r["event"] == "val"
    ]
    assert summary["step"] == 4 and len(val) == 3 and val[2] < val[0]
    samples = (tmp_path / "run" / "samples.txt").read_text()
    assert (
        "[user] Hello! Who are you?\\n[assistant] " in samples
        and "[user] What is the capital of France?" in samples
    )
    # it resumes like any run, to the same losses as an uninterrupted one
    sft.train(
        train_config("sft", [*args, "max_steps=6"]),
        chat_data_dir,
        tmp_path / "run",
    )
    whole = tmp_path / "whole"
    sft.train(
        train_config("sft", [*args, "max_steps=6"]),
        chat_data_dir,
        whole,
    )
    assert losses(tmp_path / "run") == losses(whole)
    assert gathered.load_model(tmp_path / "run").config.chat


def test_sft_of_an_export_of_ours(run_dir, chat_data_dir, tmp_path):
    exported = export_hf(gathered.load_model(run_dir), tmp_path / "export")
    cfg = train_config("sft", [f"init_from={exported}", *CHAT_SMALL[4:], "compile=false"])
    trainer = sft.SFTTrainer(resolve(cfg, CPU), chat_data_dir, tmp_path / "r")
    base = gathered.load_model(run_dir)
    assert trainer.cfg.model.chat and trainer.cfg.model.n_embd == base.config.n_embd
    torch.testing.assert_close(
        trainer.raw.transformer.wte.weight[:50257], base.transformer.wte.weight[:50257]
    )
    loss = trainer.train_step(0).loss
    assert 0 < loss < 2 * math.log(50263)


def test_sft_errors(chat_data_dir, data_dir, tmp_path):
    with pytest.raises(
        tr.TrainingError, match="not conversation data; prepare it with `gpt2repro prepare --chat`"
    ):
        sft.train(sft_cfg("max_steps=1"), data_dir, tmp_path / "a")
    with pytest.raises(tr.TrainingError, match="holds rows of 64 tokens but seq_len=32: set seq_len=64"):
        sft.train(sft_cfg("max_steps=1", "seq_len=32"), chat_data_dir, tmp_path / "b")
    with pytest.raises(ConfigError, match="needs a chat model: model.chat=true"):
        sft.train(sft_cfg("max_steps=1", "model.chat=false"), chat_data_dir, tmp_path / "c")
    cfg = train_config("cpu-tiny", [*CHAT_SMALL, "max_steps=1"])
    with pytest.raises(ShardError, match="holds conversations with loss masks: fine-tune a chat model"):
        tr.train(cfg, chat_data_dir, tmp_path / "d")


def test_every_rank_samples_the_same_replies(chat_data_dir, tmp_path):
    """Under FSDP each forward pass of a reply is a collective: ranks drawing replies of different
    lengths would leave one waiting for ever, so no rank may sample differently."""
    trainer = sft.SFTTrainer(
        resolve(sft_cfg("sample_count=2", "sample_tokens=24"), CPU), chat_data_dir, tmp_path
    )
    first = trainer.samples()
    trainer.info = DistInfo(1, 1, 2, torch.device("cpu"))
    assert trainer.samples() == first
