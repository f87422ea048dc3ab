"""`eval chat` (assistant-token loss, template adherence) and `eval harness --apply-chat-template`."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_one_line_error
from test_harness import hellaswag_task_dir, local_hellaswag  # noqa: F401 - fixtures

from conftest import shakespeare_dialogues
from gpt2repro.checkpoint.gathered import load_model
from gpt2repro.cli import main
from gpt2repro.config.schema import model_config
from gpt2repro.data.loader import DataLoader
from gpt2repro.evals import chat as chat_eval
from gpt2repro.model.gpt import GPT
from gpt2repro.text import chat


def test_the_val_conversations_are_the_held_out_ones(chat_data_dir):
    held_out = chat_eval.conversations(chat_data_dir)
    dialogues = shakespeare_dialogues(400)
    rendered = [chat.render(d["messages"])[:64] for d in dialogues[: len(held_out)]]
    assert held_out == rendered and len(held_out) >= 8  # 8 rows hold at least one each, in order


def test_adherence_and_loss_of_a_trained_and_an_untrained_model(chat_run_dir):
    data = chat_run_dir.parent / "data"
    trained = chat_eval.evaluate(load_model(chat_run_dir), data, limit=5, max_new_tokens=8)
    assert (trained["ended"], trained["replies"], trained["adherence"]) == (5, 5, 1.0)
    torch.manual_seed(0)
    fresh = GPT(model_config("tiny").as_chat())
    untrained = chat_eval.evaluate(fresh, data, limit=5, max_new_tokens=8)
    assert untrained["adherence"] == 0.0 and trained["loss"] < 1.0 < untrained["loss"]
    loader = DataLoader(data, "val", 1, 64, masks=True)  # the loss, computed directly
    x, y = loader.next_batch()
    with torch.no_grad():
        ref = F.cross_entropy(fresh(x)[0].double().flatten(0, 1), y.flatten(), ignore_index=-1)
    assert untrained["loss"] == pytest.approx(ref.item(), rel=1e-6)
    assert (
        untrained["learned_tokens"] == int((y >= 0).sum()) == 7 * 4
    )  # 7 greetings a row: "Hello there." and the end


def test_a_reply_that_runs_on_is_not_adherent(chat_run_dir):
    data = chat_run_dir.parent / "data"
    model = load_model(chat_run_dir)
    held_out = chat_eval.conversations(data)[:3]
    assert chat_eval.adherence(model, held_out, max_new_tokens=4) == (3, 3)  # 3 tokens, then the end
    assert chat_eval.adherence(model, held_out, max_new_tokens=3) == (0, 3)  # the end would be 4th


def test_cli_eval_chat(chat_run_dir, run_dir, data_dir, tmp_path, capsys):
    data = chat_run_dir.parent / "data"
    out = tmp_path / "chat.json"
    argv = ["eval", "chat", "--checkpoint", chat_run_dir, "--data", data, "--limit", "2", "--json", out]
    assert main([str(a) for a in argv]) == 0
    assert "template adherence 2/2 = 1.000" in capsys.readouterr().out
    assert json.loads(out.read_text())["replies"] == 2
    base = ["eval", "chat", "--checkpoint", run_dir, "--data", data]
    assert_one_line_error(capsys, base, "is a base model without chat tokens")
    assert_one_line_error(capsys, [*argv[:6], "--limit", "0"], "--limit, --max-new-tokens and --batch-size")
    assert_one_line_error(capsys, [*argv[:4], "--data", data_dir], "not conversation data")


def test_harness_applies_our_chat_template(chat_run_dir, run_dir, monkeypatch, local_hellaswag):  # noqa: F811
    pytest.importorskip("lm_eval")
    from gpt2repro.evals import harness

    seen = []
    real = harness.score_tokens

    def spy(model, pairs, *args):
        seen.extend(pairs)
        return real(model, pairs, *args)

    monkeypatch.setattr(harness, "score_tokens", spy)
    model = load_model(chat_run_dir)
    tasks = local_hellaswag
    results = harness.run_harness(
        model, ["hellaswag_local"], torch.device("cpu"), 2, str(tasks), apply_chat_template=True
    )
    assert set(results["hellaswag_local"]) >= {"acc", "acc_norm"}
    context = seen[0][0]
    U, UE, A = (chat.TOKEN_IDS[t] for t in (chat.USER_START, chat.USER_END, chat.ASSISTANT_START))
    assert context[:2] == [50256, U] and context[-2:] == [UE, A]  # the question as a user turn
    with pytest.raises(harness.HarnessError, match="--apply-chat-template needs a chat model"):
        harness.run_harness(
            load_model(run_dir),
            ["hellaswag_local"],
            torch.device("cpu"),
            2,
            str(tasks),
            apply_chat_template=True,
        )


def test_data_prepared_before_spans_were_recorded_is_refused_before_any_row_is_read(
    chat_run_dir, tmp_path, monkeypatch
):
    import shutil

    data = shutil.copytree(chat_run_dir.parent / "data", tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry.pop("spans", None)  # as an earlier version wrote it
    (data / "manifest.json").write_text(json.dumps(manifest))

    def no_loss_pass(*args):
        raise AssertionError("the loss pass ran before the data was refused")

    monkeypatch.setattr(chat_eval, "assistant_loss", no_loss_pass)
    with pytest.raises(chat_eval.ShardError, match="did not record where its conversations lie"):
        chat_eval.evaluate(load_model(chat_run_dir), data, limit=1, max_new_tokens=2)
