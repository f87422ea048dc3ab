"""Runs described by files: `train --config FILE` (TOML, or the JSON runs write), `presets NAME`
printing the resolved config, `presets --keys`, the files in configs/, `--version`, output into a
closed pipe, and a CLI that does not load torch for what needs none."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
from helpers import SMALL, assert_one_line_error, events, losses

from conftest import ROOT, shared_file
from gpt2repro import __version__
from gpt2repro.cli import main
from gpt2repro.config.configfile import keys_table, to_toml, tomllib
from gpt2repro.config.overrides import config_keys
from gpt2repro.config.presets import TRAIN_PRESETS, train_config
from gpt2repro.config.schema import DTYPE_NAMES, ConfigError, GPTConfig, TrainConfig
from gpt2repro.model import precision

USER_PRESETS = ("gpt2-124m-10B", "gpt2-124m-40B", "gpt2-124m-muon", "finetune", "sft", "cpu-demo")


def printed(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }


@pytest.mark.slow
def test_a_run_from_a_file_and_from_its_config_json_repeat_the_presets_run(capsys, data_dir, tmp_path):
    """preset -> `presets NAME` file -> run -> config.json -> run: one config, the same losses."""
    small = [*SMALL, "max_steps=3", "val_every=2"]
    (tmp_path / "tiny.toml").write_text(printed(capsys, "presets", "cpu-tiny", *small))
    direct, from_toml, from_json = (tmp_path / n for n in ("direct", "toml", "json"))
    printed(capsys, "train", "--preset", "cpu-tiny", "--data", data_dir, "--out", direct, *small)
    printed(capsys, "train", "--config", tmp_path / "tiny.toml", "--data", data_dir, "--out", from_toml)
    config_json = from_toml / "config.json"
    printed(capsys, "train", "--config", config_json, "--data", data_dir, "--out", from_json)
    assert (
        config_json.read_text()
        == (direct / "config.json").read_text()
        == (from_json / "config.json").read_text()
    )
    assert len(losses(direct)) == 3 and losses(direct) == losses(from_toml) == losses(from_json)
    val = [[e["loss"] for e in events(run, "val")] for run in (direct, from_toml, from_json)]
    assert len(val[0]) == 3 and val[0] == val[1] == val[2]  # steps 0, 2 and the final 3


@pytest.mark.slow
def test_a_fine_tune_repeats_from_its_config_json(capsys, data_dir, tmp_path):
    """config.json of an init_from run carries the weights' architecture; handed back, it runs the same."""
    tiny = shared_file("tiny-gpt2")
    small = ["micro_batch_size=2", "seq_len=32", "total_batch_size=128", "max_steps=2", "log_every=0"]
    small += ["val_every=0", "sample_every=0", "compile=false", f"init_from={tiny}"]
    printed(capsys, "train", "--preset", "finetune", "--data", data_dir, "--out", tmp_path / "a", *small)
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["model"]["n_embd"] == 2  # the weights', not the preset's 768
    out = printed(
        capsys,
        "train",
        "--config",
        tmp_path / "a" / "config.json",
        "--data",
        data_dir,
        "--out",
        tmp_path / "b",
    )
    assert "the weights' architecture" not in out  # the file said what the weights are
    assert (tmp_path / "b" / "config.json").read_text() == (tmp_path / "a" / "config.json").read_text()
    assert losses(tmp_path / "b") == losses(tmp_path / "a") and len(losses(tmp_path / "a")) == 2
    # a file whose [model] disagrees with the weights: the weights win, and the run says so
    (tmp_path / "c.json").write_text(json.dumps({**saved, "model": {**saved["model"], "n_layer": 3}}))
    out = printed(
        capsys, "train", "--config", tmp_path / "c.json", "--data", data_dir, "--out", tmp_path / "c"
    )
    assert f"init_from={tiny}: the weights' architecture, not the config's: n_layer=2" in out
    assert json.loads((tmp_path / "c" / "config.json").read_text()) == saved


def test_precedence_is_preset_then_file_then_overrides(tmp_path):
    (tmp_path / "f.toml").write_text(
        'preset = "cpu-tiny"\nmax_steps = 7\nmax_lr = 1e-3\n[model]\nn_layer = 3\n'
    )
    cfg = train_config(None, ["max_steps=9"], tmp_path / "f.toml")
    tiny = train_config("cpu-tiny")
    assert (cfg.max_steps, cfg.max_lr, cfg.model.n_layer) == (9, 1e-3, 3)  # override > file > preset
    assert dataclasses.replace(cfg, max_steps=60, max_lr=3e-3, model=tiny.model) == tiny  # the rest: preset's
    assert train_config("cpu-tiny", [], tmp_path / "f.toml") == train_config(None, [], tmp_path / "f.toml")
    # a file without a preset starts from the defaults; a bad file value an override replaces is never used
    (tmp_path / "g.json").write_text(json.dumps({"max_lr": -1, "warmup_steps": 3.0}))
    cfg = train_config(None, ["max_lr=1e-3"], tmp_path / "g.json")
    assert dataclasses.replace(cfg, max_lr=6e-4, warmup_steps=715) == TrainConfig()
    assert isinstance(cfg.warmup_steps, int) and isinstance(
        train_config(None, [], tmp_path / "f.toml").max_lr, float
    )
    with pytest.raises(ConfigError, match="a run needs a preset"):
        train_config()


def test_init_from_in_a_file_refuses_architecture_overrides(tmp_path):
    (tmp_path / "ft.toml").write_text('preset = "finetune"\ninit_from = "gpt2-medium"\n')
    with pytest.raises(ConfigError, match="model.n_layer cannot be set with init_from=gpt2-medium"):
        train_config(None, ["model.n_layer=4"], tmp_path / "ft.toml")
    assert train_config(None, ["model.vocab_multiple=128"], tmp_path / "ft.toml").model.vocab_multiple == 128


BAD_FILES = [
    ("c.toml", "max_stepz = 5", "c.toml:1: unknown config key 'max_stepz'; valid keys: total_batch_size"),
    ("c.toml", "# a comment\n[model]\nn_layers = 4", "c.toml:3: unknown config key 'model.n_layers'"),
    ("c.toml", "[optim]\nlr = 1", "c.toml:2: unknown config key 'optim.lr'"),
    ("c.toml", "model.n_layerz = 1", "c.toml:1: unknown config key 'model.n_layerz'"),
    ("c.toml", "max_steps = 1.5", "c.toml:1: max_steps=1.5: expected an integer"),
    ("c.toml", "max_steps = true", "c.toml:1: max_steps=True: expected an integer"),
    ("c.toml", 'shuffle = "yes"', "c.toml:1: shuffle='yes': expected true or false"),
    ("c.toml", 'max_lr = "fast"', "c.toml:1: max_lr='fast': expected a number"),
    ("c.toml", 'compile = "auto"', "c.toml:1: compile='auto': expected true or false"),
    ("c.toml", "seed = 1\nmax_lr = -1.0", "c.toml:2: max_lr=-1.0: expected a positive number"),
    ("c.toml", "max_lr = nan", "c.toml:1: max_lr=nan: expected a positive number"),
    ("c.toml", "[model]\nblock_size = 1e9", "c.toml:2: model.block_size=1000000000: expected at most 131072"),
    ("c.toml", "[model]\nn_head = 5", "c.toml:2: model.n_embd=128 is not divisible by model.n_head=5"),
    ("c.toml", "seq_len = 4096", "c.toml:1: seq_len=4096 exceeds model.block_size=256"),
    ("c.toml", 'dtype = "fp8"', "c.toml:1: dtype='fp8' is not one of auto, fp32, bf16, fp16"),
    ("c.toml", "val_steps = 0", "c.toml:1: val_steps=0 with val_every>0"),
    ("c.toml", "model = 3", "c.toml:1: model=3: expected a table of architecture keys"),
    ("c.toml", "preset = 3", "c.toml:1: preset=3: expected a preset name"),
    ("c.toml", 'preset = "gpt5"', "c.toml:1: unknown training preset 'gpt5'"),
    (
        "c.toml",
        'preset = "cpu-demo"\nseed = 1',
        "c.toml:1: preset='cpu-demo' but the preset given is 'cpu-tiny'; name it once",
    ),
    ("c.toml", "max_steps = \nseed = 1", "c.toml: not valid TOML: Invalid value (at line 1, column 13)"),
    ("c.json", '{"max_stepz": 1}', "c.json: unknown config key 'max_stepz'"),
    ("c.json", '{"model": {"n_layer": "4"}}', "c.json: model.n_layer='4': expected an integer"),
    ("c.json", "[1, 2]", "c.json: expected an object of config keys, not list"),
    ("c.json", '{\n"max_steps": 3,\n}', "c.json:3: not valid JSON (Expecting property name"),
    ("c.yaml", "max_steps: 3", "c.yaml: a config file is .toml or .json"),
]


@pytest.mark.parametrize("name,text,fragment", BAD_FILES, ids=[f"{n}-{t[:20]}" for n, t, _ in BAD_FILES])
def test_bad_files_are_one_line_errors_naming_file_key_and_line(capsys, tmp_path, name, text, fragment):
    (tmp_path / name).write_text(text)
    preset = [] if text.startswith("preset") and "seed" not in text else ["--preset", "cpu-tiny"]
    argv = [
        "train",
        *preset,
        "--config",
        tmp_path / name,
        "--data",
        tmp_path,
        "--out",
        tmp_path / "run",
    ]
    assert_one_line_error(capsys, argv, str(tmp_path / fragment))
    assert not (tmp_path / "run").exists()  # refused before any work


def test_unreadable_files_and_missing_presets_are_one_line_errors(capsys, tmp_path):
    base = ["train", "--data", tmp_path, "--out", tmp_path / "run"]
    assert_one_line_error(capsys, [*base, "--config", tmp_path / "no.toml"], "no.toml: no such config file")
    assert_one_line_error(capsys, [*base, "--config", tmp_path], "a directory, not a config file")
    (tmp_path / "latin1.toml").write_bytes(b'sample_prompt = "caf\xe9"')
    assert_one_line_error(
        capsys, [*base, "--config", tmp_path / "latin1.toml"], "latin1.toml: not UTF-8 text"
    )
    assert_one_line_error(capsys, base, "a run needs a preset or a config file")
    # a file's bad value that the command line replaces is no error; one the command line sets is its own
    (tmp_path / "ok.toml").write_text("max_lr = -1.0")
    assert train_config("cpu-tiny", ["max_lr=1e-3"], tmp_path / "ok.toml").max_lr == 1e-3
    with pytest.raises(ConfigError, match=r"^max_lr=-2.0: expected a positive number$"):
        train_config("cpu-tiny", ["max_lr=-2"], tmp_path / "ok.toml")


@pytest.mark.parametrize("name", list(TRAIN_PRESETS))
def test_presets_print_their_resolved_config_as_toml_and_json(capsys, tmp_path, name):
    text = printed(capsys, "presets", name)
    cfg = train_config(name)
    assert tomllib.loads(text) == cfg.to_dict()
    (tmp_path / "p.toml").write_text(text)
    assert train_config(None, [], tmp_path / "p.toml") == cfg
    assert printed(capsys, "presets", name, "--format", "json") == cfg.to_json() + "\n"


def test_presets_resolve_overrides_and_files(capsys, tmp_path):
    out = printed(capsys, "presets", "cpu-tiny", "max_steps=5", "--format", "json", "model.n_layer=2")
    assert json.loads(out) == train_config("cpu-tiny", ["max_steps=5", "model.n_layer=2"]).to_dict()
    (tmp_path / "f.toml").write_text('preset = "cpu-demo"\nseed = 7\n')
    out = printed(capsys, "presets", "--config", tmp_path / "f.toml", "max_steps=3")
    assert tomllib.loads(out) == train_config("cpu-demo", ["seed=7", "max_steps=3"]).to_dict()
    assert_one_line_error(capsys, ["presets", "max_steps=3"], "key=value overrides need a preset NAME")
    assert_one_line_error(capsys, ["presets", "gpt5"], "unknown training preset 'gpt5'")
    ft = printed(capsys, "presets", "finetune")
    assert "# init_from is set: the run takes these from the weights" in ft.split("[model]")[1]


@pytest.mark.parametrize(
    "prompt", ['say "hi"\\n', "tab\there\nnew line", "\x00\x1f\x7f control", "é ✓ 😀 \u2028", "'''", ""]
)
def test_toml_strings_read_back_exactly(prompt):
    cfg = train_config("cpu-tiny", ["sample_every=0", "grad_clip=inf"])
    cfg.sample_prompt = prompt
    assert tomllib.loads(to_toml(cfg, "test")) == cfg.to_dict()


def test_keys_cover_every_field_with_type_default_and_meaning(capsys):
    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "model"]
    fields += [f"model.{f.name}" for f in dataclasses.fields(GPTConfig)]
    keys = config_keys()
    assert [k for k, *_ in keys] == fields
    defaults = {**TrainConfig().to_dict(), **{f"model.{k}": v for k, v in GPTConfig().__dict__.items()}}
    for key, typ, default, meaning in keys:
        assert default == defaults[key] and type(default) is typ, key
        assert meaning and "\n" not in meaning and len(meaning) < 140, key
    listed = printed(capsys, "presets", "--keys").splitlines()
    assert len(listed) == len(keys)
    for line, (key, _, _, meaning) in zip(listed, keys):
        assert line.split()[0] == key and line.endswith(meaning)
    assert re.match(r"optimizer +adamw\|muon +adamw +adamw \(the original\)", listed[3])


def test_configs_directory_is_what_presets_print(capsys):
    """configs/ holds the presets users start from, as `presets NAME` prints them (regenerated by
    scripts/gen_config_docs.py), and each reads back as its preset."""
    files = sorted(p.stem for p in (ROOT / "configs").glob("*.toml"))
    assert files == sorted(USER_PRESETS)
    for name in files:
        assert (ROOT / "configs" / f"{name}.toml").read_text() == printed(capsys, "presets", name), name
        assert train_config(None, [], ROOT / "configs" / f"{name}.toml") == train_config(name)


def test_docs_key_tables_are_the_codes():
    """docs/config.md holds every key's row and docs/training.md some, each as keys_table(markdown=True)
    has it (regenerated by scripts/gen_config_docs.py)."""
    rows = {line.split("`")[1]: line for line in keys_table(markdown=True).splitlines()[2:]}
    doc = (ROOT / "docs" / "config.md").read_text()
    assert keys_table(markdown=True) in doc
    readme = [
        line
        for line in (ROOT / "docs" / "training.md").read_text().splitlines()
        if re.match(r"\| `[\w.]+` \|", line)
    ]
    in_readme = [line.split("`")[1] for line in readme if line.split("`")[1] in rows]
    assert "muon_lr" in in_readme and "optimizer" in in_readme
    assert [line for line in readme if line.split("`")[1] in rows] == [rows[k] for k in in_readme]


def test_version_is_the_packages(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert capsys.readouterr().out == f"gpt2repro {project['version']}\n" == f"gpt2repro {__version__}\n"


@pytest.mark.parametrize("buffered", [True, False])
@pytest.mark.parametrize("argv", [["presets", "--keys"], ["presets", "cpu-tiny"], ["--help"]])
def test_output_into_a_closed_pipe_ends_quietly(argv, buffered):
    environ = {k: v for k, v in env().items() if k != "PYTHONUNBUFFERED"}
    environ.update({} if buffered else {"PYTHONUNBUFFERED": "1"})
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write, as `| head` is after its lines
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2repro", *argv],
        env=environ,
        stdout=write,
        stderr=subprocess.PIPE,
    )
    os.close(write)
    err = proc.stderr.read().decode()
    # argparse drops what it cannot write itself; an unbuffered --help is then done, and exits 0
    codes = (0, 141) if argv == ["--help"] else (141,)
    assert proc.wait() in codes and err == ""


def test_presets_into_head_has_no_traceback():
    shell = f"{sys.executable} -m gpt2repro presets | head -1"
    done = subprocess.run(["bash", "-c", shell], env=env(), capture_output=True, text=True)
    assert done.stderr == "" and done.stdout.startswith("gpt2-124m-10B ")


def test_help_version_and_presets_do_not_load_torch():
    code = (
        "import sys\nfrom gpt2repro.cli import main\n"
        "for argv in (['--help'], ['presets'], ['presets', 'finetune'], ['presets', '--keys'], ['train', '--help'], ['--version']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'tiktoken')))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "[]"


def test_every_user_error_class_derives_from_the_one_base_the_cli_catches():
    """The CLI catches errors.UserError alone (so it imports none of their modules): every layer's
    error class must derive from it."""
    import importlib

    from gpt2repro.errors import UserError

    found = {}
    for path in (ROOT / "src" / "gpt2repro").rglob("*.py"):
        for name in re.findall(r"^class (\w+Error)\(", path.read_text(), re.M):
            module = ".".join(path.relative_to(ROOT / "src" / "gpt2repro").with_suffix("").parts)
            found[f"{module}.{name}"] = getattr(importlib.import_module(f"gpt2repro.{module}"), name)
    assert len(found) >= 16 and "files.lock.LockError" in found and "files.fsio.WriteError" in found
    assert [name for name, cls in found.items() if not issubclass(cls, UserError)] == []


def test_the_cli_dtype_names_are_precisions():
    assert tuple(precision.DTYPES) == DTYPE_NAMES


def test_python_310_reads_toml_with_tomli(tmp_path):
    """Where tomllib is missing (Python 3.10), tomli reads the same files."""
    pytest.importorskip("tomli")
    (tmp_path / "f.toml").write_text('preset = "cpu-tiny"\nmax_steps = 7\n')
    code = (
        "import sys\nsys.modules['tomllib'] = None\n"
        "from gpt2repro.config import configfile\nfrom gpt2repro.config.presets import train_config\n"
        f"print(configfile.tomllib.__name__, train_config(None, [], {str(tmp_path / 'f.toml')!r}).max_steps)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["tomli", "7"]
