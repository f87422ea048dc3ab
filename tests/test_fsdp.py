"""FSDP2 as torchtitan uses it, on 2 gloo ranks: the model built on the meta device and initialised
after sharding to exactly one process's weights and random state, no rank holding the whole model,
bf16 weights gathered with fp32 gradients reduced, and the blocks compiled one by one.
(`fsdp_probe.py` does the measuring inside torchrun; the training runs go through the CLI.)"""

import json

import pytest
from helpers import SMALL, events, losses, run_script, run_to_end, train_argv

from conftest import ROOT, shared_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> dict[str, list[dict]]:
    """{mode: each rank's report} of every `fsdp_probe.py` mode, from one torchrun launch of 2
    processes (a launch each cost ~7 CPU-s of start-up). `memory` goes first: it reads the peak
    resident memory, and glibc keeps freed blocks under its (adaptive) mmap threshold in its heap; a
    fixed 1 MB threshold hands them back, so resident memory is what the build holds, not what the
    allocator caches."""
    out = tmp_path_factory.mktemp("probe")
    modes = "memory,init,bf16,compile"
    done = run_script(ROOT / "tests" / "fsdp_probe.py", modes, out, MALLOC_MMAP_THRESHOLD_="1048576")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    return {mode: [reports[mode] for reports in ranks] for mode in modes.split(",")}


def test_meta_device_init_equals_one_process_bit_for_bit_and_leaves_the_same_random_state(probed):
    for report in probed["init"]:
        # padded vocabulary rows, the chat rows, and pretrained weights copied into the shards
        for case in ("padded", "chat", "pretrained"):
            assert report[case] == {"differ": [], "params": 28, "rng_equal": True, "tied": True}, (
                case,
                report,
            )


def test_no_rank_materialises_the_whole_model(probed):
    for report in probed["memory"]:
        assert report["sharded_on"] == ["meta"]  # nothing was allocated before sharding
        model, largest = report["model"], report["largest"]
        assert model > 400e6 and largest < model / 30
        # this rank's half, plus the few whole parameters drawn (and split) one at a time
        assert report["growth"] < model / 2 + 4 * largest < 0.65 * model, report
        # the build's first forward pass gathers a few blocks at a time, never the whole model
        assert report["growth_with_first_forward"] < 0.85 * model, report


def test_bf16_gathers_bf16_weights_and_keeps_fp32_shards_and_gradients(probed):
    for report in probed["bf16"]:
        assert report["bf16"] == {
            "computes_with": ["torch.bfloat16"],
            "all_gather_single": ["torch.bfloat16"],
            "reduce_scatter_single": ["torch.float32"],
            "sharded": ["torch.float32"],
            "grads": ["torch.float32"],
        }
        assert report["fp32"] == dict.fromkeys(report["bf16"], ["torch.float32"])  # no policy: all fp32


def test_blocks_compile_one_by_one_without_graph_breaks_or_recompiles(probed):
    for report in probed["compile"]:
        # one graph, compiled in step 0, serves both blocks in every later step (the build's first
        # forward pass runs eagerly: a 1-token graph would make the training shapes dynamic)
        assert report["graphs"] == [1, 1, 1]
        assert report["breaks"] == 0
        assert report["blocks_compiled"] == [True, True] and not report["root_compiled"]


def test_fsdp_compiled_per_block_trains_as_fsdp_eager(data_dir, tmp_path):
    shared_file("hellaswag_val.jsonl.gz")
    common = [*train_argv(data_dir, *SMALL), "max_steps=3", "fsdp=true", "activation_checkpointing=full"]
    common += ["val_every=2", "val_steps=1", "hellaswag_every=3", "hellaswag_limit=4"]
    common += ["sample_every=3", "sample_count=1", "sample_tokens=4"]
    for run, compile_model in (("eager", "false"), ("compiled", "true")):
        run_to_end([*common, f"compile={compile_model}", "--out", str(tmp_path / run)], nproc=2)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == [0, 1, 2]
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5)
    val = [[r["loss"] for r in events(tmp_path / run, "val")] for run in ("eager", "compiled")]
    assert len(val[0]) == 3 and val[1] == pytest.approx(val[0], rel=1e-5)
    # HellaSwag and sampling run the compiled blocks eagerly: other lengths, a KV cache
    hellaswag = [
        [r["acc_norm"] for r in events(tmp_path / run, "hellaswag")] for run in ("eager", "compiled")
    ]
    assert len(hellaswag[0]) == 2 and hellaswag[1] == hellaswag[0]
    samples = [(tmp_path / run / "samples.txt").read_text() for run in ("eager", "compiled")]
    assert "Hello, I'm a language model," in samples[1] and samples[1] == samples[0]


def test_bf16_fsdp_trains_like_one_bf16_process_and_evaluates_in_the_loop(data_dir, tmp_path):
    shared_file("hellaswag_val.jsonl.gz")
    common = [*train_argv(data_dir, *SMALL), "max_steps=3", "dtype=bf16"]
    run_to_end([*common, "--out", str(tmp_path / "one")])
    evals = ["hellaswag_every=3", "hellaswag_limit=4", "sample_every=3", "sample_count=1", "sample_tokens=4"]
    run_to_end([*common, "fsdp=true", *evals, "--out", str(tmp_path / "two")], nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [0, 1, 2]
    for step in one:  # bf16 weights and a bf16 residual stream inside the blocks: close, not equal
        assert two[step] == pytest.approx(one[step], rel=3e-4)
    assert [r["n"] for r in events(tmp_path / "two", "hellaswag")] == [4, 4]
    assert "Hello, I'm a language model," in (tmp_path / "two" / "samples.txt").read_text()
