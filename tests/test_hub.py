"""Every path to the Hugging Face hub, through a local hub that speaks its protocol and fails on
purpose (tests/localhub.py), reached as a user reaches a mirror: `HF_ENDPOINT` on any port.
`prepare --source hf-shards:` gives the hub's very bytes; each fault kind alone and a mix of them end
with the output of a fault-free run; a persistent failure is one line within the retry cap."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import run_main
from test_hubshards import documents, llmc_shard

from conftest import shared_file
from gpt2repro.bench.hubserver import KINDS, Faults, LocalHub, Repo
from gpt2repro.data import prepare as prep
from gpt2repro.data.shards import read_shard
from gpt2repro.files import hub as hubmod

pytest.importorskip("huggingface_hub")
REPO = "someone/edu-gpt2"
FAST = {  # retries that wait milliseconds, and a stall detected in one second
    "GPT2REPRO_DOWNLOAD_BACKOFF": "0.01",
    "GPT2REPRO_DOWNLOAD_TIMEOUT": "1",
    "GPT2REPRO_DOWNLOAD_RETRIES": "6",
}


@pytest.fixture(scope="module")
def shard_files(tmp_path_factory) -> dict[str, bytes]:
    """A val shard and three train shards as llm.c names them, 100k tokens (200 KB) each."""
    d = tmp_path_factory.mktemp("llmc")
    names = ["edu_val_000000.bin"] + [f"edu_train_{i:06d}.bin" for i in (1, 2, 3)]
    files = {n: llmc_shard(d / n, documents(100_000, seed)).read_bytes() for seed, n in enumerate(names)}
    return {**files, "README.md": b"GPT-2 tokens"}


@pytest.fixture
def hub(monkeypatch, shard_files):
    with LocalHub() as h:
        h.add(Repo(REPO, "dataset", shard_files))
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        for key, value in FAST.items():
            monkeypatch.setenv(key, value)
        yield h


def fetch(out, **kw):
    return prep.prepare([f"hf-shards:{REPO}"], out, progress=False, **kw)


def published(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, shard_files) -> dict[str, bytes]:
    """What a fault-free fetch through the local hub publishes."""
    out = tmp_path_factory.mktemp("clean") / "data"
    mp = pytest.MonkeyPatch()
    with LocalHub() as h:
        h.add(Repo(REPO, "dataset", shard_files))
        mp.setenv("HF_ENDPOINT", h.url)
        try:
            fetch(out)
        finally:
            mp.undo()
    return published(out)


def test_hub_shards_through_a_mirror_on_any_port_are_the_hubs_bytes(hub, shard_files, tmp_path):
    """The README's fastest route, at a mirror on a port that is not 443 (refused as unreachable
    before), through the real huggingface_hub listing: the shards are the hub's files, byte for byte."""
    assert not hub.url.endswith(":443")
    m = fetch(tmp_path / "d", val_tokens=5000)
    out = published(tmp_path / "d")
    for i in (1, 2, 3):
        assert out[f"train_{i:06d}.bin"] == shard_files[f"edu_train_{i:06d}.bin"]
    np.testing.assert_array_equal(
        read_shard(tmp_path / "d" / "val_000000.bin"),
        np.frombuffer(shard_files["edu_val_000000.bin"][1024:], "<u2")[:5000],
    )
    assert m["complete"] and m["commit"] == hub.repos[("dataset", REPO)].sha
    # each listed as its bytes' sha256 (the hub's, checked by the download; the cut one's, computed)
    assert all(s["sha256"] == hashlib.sha256(out[s["file"]]).hexdigest() for s in m["shards"])
    assert sorted(os.listdir(tmp_path / "d")) == [
        "manifest.json",
        *sorted(k for k in out if k != "manifest.json"),
    ]
    gets = [r for r in hub.requests("/resolve/") if r[0] == "GET"]
    assert len(gets) == 4 and all(f"/resolve/{m['commit']}/" in r[1] for r in gets)  # one commit pinned


def test_hub_reachability_is_checked_at_the_endpoints_own_port(hub, monkeypatch):
    assert hubmod.unreachable() is None
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert f"127.0.0.1:{port} unreachable" in hubmod.unreachable()


@pytest.mark.parametrize("kind", KINDS)
def test_each_fault_alone_ends_with_the_fault_free_output(hub, kind, clean_run, tmp_path, capsys):
    hub.faults = Faults(plan=[kind, kind], only=".bin", stall_seconds=2.5)
    fetch(tmp_path / "d")
    assert published(tmp_path / "d") == clean_run
    assert hub.faults.injected[kind] == 2
    retries = [line for line in capsys.readouterr().err.splitlines() if "; retry " in line]
    assert len(retries) == 2 and all("edu_val_000000.bin" in line for line in retries), retries
    if kind in ("reset", "stall", "short"):  # half the body had arrived: the rest is asked for, not all of it
        ranged = [r[3] for r in hub.requests("edu_val_000000.bin") if r[3]]
        assert ranged and all(r.startswith("bytes=") and r != "bytes=0-" for r in ranged), ranged


def test_a_mix_of_faults_ends_with_the_fault_free_output(hub, shard_files, tmp_path):
    """Every other request fails, cycling through every kind, over eleven files."""
    many = {f"edu_train_{i:06d}.bin": shard_files[f"edu_train_{1 + i % 3:06d}.bin"] for i in range(1, 11)}
    hub.add(
        Repo("someone/many", "dataset", {**many, "edu_val_000000.bin": shard_files["edu_val_000000.bin"]})
    )
    clean = prep.prepare(["hf-shards:someone/many"], tmp_path / "clean", progress=False)
    hub.faults = Faults(every=2, only=".bin", stall_seconds=2.5)
    assert prep.prepare(["hf-shards:someone/many"], tmp_path / "d", progress=False) == clean
    assert published(tmp_path / "d") == published(tmp_path / "clean")
    assert set(hub.faults.injected) == set(KINDS)
    for i in range(1, 11):
        assert (tmp_path / "d" / f"train_{i:06d}.bin").read_bytes() == many[f"edu_train_{i:06d}.bin"]


def test_a_persistent_failure_is_one_line_within_the_cap(hub, tmp_path, capsys):
    hub.faults = Faults(always="503", only="edu_train_000002")
    out = tmp_path / "d"
    argv = ["prepare", "--source", f"hf-shards:{REPO}", "--out", str(out), "--max-shards", "3"]
    code, _, err = run_main(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("prepare:")]
    assert code == 2 and "Traceback" not in err
    *retries, last = lines
    assert len(retries) == 5 and all("edu_train_000002.bin: HTTP 503; retry" in r for r in retries)
    assert last.startswith(f"gpt2repro: error: hf-shards:{REPO}: edu_train_000002.bin: gave up after 6 tries")
    assert "(last: HTTP 503)" in last and f"({' '.join(['gpt2repro', *argv])})" in last
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and [s["file"] for s in manifest["shards"]] == [
        "val_000000.bin",
        "train_000001.bin",
    ]  # kept; nothing marked complete that is not
    # a Retry-After longer than the whole cap: given up at once, saying so
    hub.faults = Faults(always="429", only="edu_train_000002", retry_after=3600)
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and "gave up after 1 try in" in err and "the server asked to wait 3600 s" in err
    hub.faults = Faults()
    m = prep.prepare([f"hf-shards:{REPO}"], out, max_shards=3, progress=False)  # the rerun completes it
    assert m["complete"] and len(m["shards"]) == 4


def test_a_token_is_sent_to_a_gated_repo_and_never_shown_or_recorded(
    hub, shard_files, tmp_path, monkeypatch, capsys
):
    secret = "hf_secretTOKEN1234567890"
    hub.add(Repo("org/gated", "dataset", shard_files, token=secret))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))  # no saved token either
    argv = ["prepare", "--source", "hf-shards:org/gated", "--out", str(tmp_path / "d")]
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and "cannot list the data set on the hub" in err and "401" in err
    monkeypatch.setenv("HF_TOKEN", secret)
    hub.faults = Faults(plan=["503"], only=".bin")  # a retry line too: the token in none of them
    with LocalHub() as cdn:  # the hub sends file bodies from another host: the token stays behind
        hub.redirect = cdn.url
        for data in shard_files.values():
            cdn.serve_file(f"blob/{hashlib.sha256(data).hexdigest()}", data)
        code, out, err = run_main(capsys, *argv)
    assert code == 0, err
    assert secret not in out + err
    assert all(r[4] for r in hub.requests("/resolve/")) and len(cdn.requests("/blob/")) == 4
    assert not any(r[4] for r in cdn.log)  # Authorization never sent to the other host
    for p in (tmp_path / "d").rglob("*"):
        assert (
            secret.encode() not in p.read_bytes()[-4096:]
            if p.suffix == ".bin"
            else secret.encode() not in p.read_bytes()
        )


def test_a_snapshot_of_huggingface_hubs_cache_publishes_the_files_it_links_to(hub, shard_files, tmp_path):
    """`hf-shards:DIR` on a snapshot downloaded with huggingface_hub: its files are symlinks into the
    cache's blobs/ (before, os.link linked the symlink itself and the publish failed with ELOOP)."""
    from huggingface_hub import snapshot_download

    snap = snapshot_download(REPO, repo_type="dataset", endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert os.path.islink(os.path.join(snap, "edu_train_000001.bin"))
    m = prep.prepare([f"hf-shards:{snap}"], tmp_path / "d", progress=False)
    assert m["complete"]
    for i in (1, 2, 3):
        ours = tmp_path / "d" / f"train_{i:06d}.bin"
        assert not ours.is_symlink() and ours.read_bytes() == shard_files[f"edu_train_{i:06d}.bin"]
        assert (
            ours.stat().st_ino == os.stat(os.path.join(snap, f"edu_train_{i:06d}.bin")).st_ino
        )  # the blob, linked


def _prepare_cli(hub, source, out, *extra) -> list[str]:
    return [sys.executable, "-m", "gpt2repro", "prepare", "--source", source, "--out", str(out), *extra]


def _env(hub, tmp_path) -> dict:
    return {
        **os.environ,
        **FAST,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "OMP_NUM_THREADS": "1",
    }


def _killed_then_finished(argv, env, kills: int, seed: int, window: float) -> subprocess.CompletedProcess:
    """Run `argv`, SIGKILL it at a random moment within `window` seconds `kills` times, then let it finish."""
    rng = random.Random(seed)
    for _ in range(kills):
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, window))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_hub_shards_killed_at_random_under_faults_resume_to_the_same_bytes(hub, clean_run, tmp_path):
    """SIGKILL during downloads (a slow link), publishing and manifest writes, with every other
    request failing; each rerun resumes (partial downloads by Range) and the end is the fault-free run's."""
    hub.faults = Faults(every=2, only=".bin", mix=("429", "503", "reset", "short", "corrupt"), throttle=0.1)
    out = tmp_path / "d"
    done = _killed_then_finished(_prepare_cli(hub, f"hf-shards:{REPO}", out), _env(hub, tmp_path), 4, 0, 3.0)
    assert done.returncode == 0, done.stderr[-2000:]
    assert published(out) == clean_run
    assert any(r[3] not in ("", "bytes=0-") for r in hub.requests(".bin"))  # a partial file was resumed


@pytest.fixture(scope="module")
def parquet_repo(tmp_path_factory) -> dict[str, bytes]:
    """Tiny Shakespeare's paragraphs as a two-file parquet data set, as the hub stores one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paragraphs = shared_file("tinyshakespeare.txt").read_text().split("\n\n")
    files = {}
    for i, rows in enumerate((paragraphs[:3000], paragraphs[3000:6000])):
        buf = io.BytesIO()
        pq.write_table(pa.table({"text": rows}), buf, row_group_size=200)
        files[f"data/train-{i:05d}-of-00002.parquet"] = buf.getvalue()
    return files


@pytest.mark.slow
def test_a_streamed_data_set_survives_faults_and_kills(hub, parquet_repo, tmp_path):
    """`prepare --source hf:OWNER/NAME` streams through `datasets` from the local hub: with requests
    failing (429, 5xx, resets, stalls, short bodies) and the command killed at random points (reading,
    tokenizing, writing a shard), the rerun's shards and manifest are the fault-free run's."""
    hub.add(Repo("someone/docs", "dataset", parquet_repo))
    env, extra = _env(hub, tmp_path), ("--shard-tokens", "60000", "--val-tokens", "20000")
    clean = subprocess.run(
        _prepare_cli(hub, "hf:someone/docs", tmp_path / "clean", *extra), env=env, timeout=300
    )
    assert clean.returncode == 0
    hub.faults = Faults(
        every=2, only=".parquet", mix=("429", "500", "503", "reset", "stall", "short"), stall_seconds=2
    )
    argv = _prepare_cli(hub, "hf:someone/docs", tmp_path / "d", *extra)
    done = _killed_then_finished(argv, env, 2, 1, 3.0)
    assert done.returncode == 0, done.stderr[-2000:]
    assert published(tmp_path / "d") == published(tmp_path / "clean")
    assert len(hub.faults.injected) >= 4


@pytest.fixture
def model_hub(hub, monkeypatch, tmp_path):
    """The tiny HF GPT-2 at someone/gpt2-tiny (safetensors) and someone/gpt2-bin (pytorch_model.bin,
    as older repos hold it), a llama at someone/llama; huggingface_hub's cache in tmp_path."""
    import huggingface_hub.constants
    import torch
    from safetensors.torch import load_file

    tiny = shared_file("tiny-gpt2")
    files = {p.name: p.read_bytes() for p in tiny.iterdir()}
    buf = io.BytesIO()
    torch.save(load_file(tiny / "model.safetensors"), buf)
    hub.add(Repo("someone/gpt2-tiny", "model", files))
    hub.add(
        Repo(
            "someone/gpt2-bin",
            "model",
            {"config.json": files["config.json"], "pytorch_model.bin": buf.getvalue()},
        )
    )
    llama = json.dumps({**json.loads(files["config.json"]), "model_type": "llama"}).encode()
    hub.add(
        Repo(
            "someone/llama", "model", {"config.json": llama, "model.safetensors": files["model.safetensors"]}
        )
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hfcache"))
    return hub


def test_any_gpt2_on_the_hub_loads_by_repo_id_through_faults(model_hub, capsys):
    """`--hf OWNER/NAME[@REV]` (and init_from=): the weights fetched through huggingface_hub's cache,
    surviving a 503, a reset and bytes that differ from the listed sha256; the same weights as the
    local directory; pytorch_model.bin read with weights_only; another architecture one line."""
    from gpt2repro.interop.hf import HFError, load_hf, load_pretrained

    local = load_hf(shared_file("tiny-gpt2")).state_dict()
    model_hub.faults = Faults(plan=["503", "reset", "corrupt"], only="model.safetensors")
    sha = model_hub.repos[("model", "someone/gpt2-tiny")].sha
    for spec in ("someone/gpt2-tiny", f"someone/gpt2-tiny@{sha}", "someone/gpt2-bin"):
        state = load_pretrained(spec).state_dict()
        assert state.keys() == local.keys() and all(torch_equal(state[k], local[k]) for k in local), spec
    assert dict(model_hub.faults.injected) == {"503": 1, "reset": 1, "corrupt": 1}
    for spec, fragment in [
        ("someone/llama", "a 'llama' model, not GPT-2"),
        ("someone/gpt2-tiny@nope", "could not fetch 'someone/gpt2-tiny'"),
        ("nobody/nothing", "RepositoryNotFoundError"),
    ]:
        with pytest.raises(HFError, match=fragment):
            load_hf(spec)
    code, out, err = run_main(
        capsys,
        "sample",
        "--hf",
        "someone/gpt2-tiny",
        "--prompt",
        "Hello",
        "-n",
        "1",
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
    )
    assert code == 0, err


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_an_asset_comes_from_a_mirror_url_through_faults_and_is_verified(tmp_path, monkeypatch):
    """The BPE ranks with no local copy: from `$GPT2REPRO_MIRROR_URL/gpt2.tiktoken`, surviving a 429,
    a stall and a corrupted transfer, cached only once its sha256 is the registered one."""
    from gpt2repro.files import assets

    data = shared_file("gpt2.tiktoken").read_bytes()
    monkeypatch.delenv("GPT2REPRO_ASSETS", raising=False)
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)
    with LocalHub() as h:
        monkeypatch.setenv(
            "GPT2REPRO_MIRROR_URL", h.serve_file("mirror/gpt2.tiktoken", data).rsplit("/", 1)[0]
        )
        h.faults = Faults(plan=["429", "stall", "corrupt"], retry_after=0, stall_seconds=2)
        path = assets.fetch("gpt2.tiktoken")
        assert path.read_bytes() == data and path.parent == assets.cache_dir()
        assert dict(h.faults.injected) == {"429": 1, "stall": 1, "corrupt": 1}
        h.faults = Faults(always="500")
        path.unlink()
        with pytest.raises(assets.AssetError, match="gpt2.tiktoken: gave up after 6 tries .*HTTP 500"):
            assets._from_url(assets.REGISTRY["gpt2.tiktoken"])
    kept = sorted(p.name for p in assets.cache_dir().iterdir())
    assert kept == [".gpt2.tiktoken.part"]  # the partial file kept to resume; no lock left behind


def test_a_stream_that_fails_midway_reopens_at_the_document_where_it_stopped(monkeypatch, capsys):
    """The reopening `datasets`' own retries leave to us: the same documents, in order, once each."""
    from gpt2repro.data import stream as streams

    monkeypatch.setenv("GPT2REPRO_DOWNLOAD_BACKOFF", "0.01")
    rows, opened, failures = [{"text": f"doc {i}"} for i in range(10)], [], iter([3, 7])
    fail_at = next(failures)

    class Fake:
        def __init__(self, start=0):
            self.start = start

        def skip(self, n):
            return Fake(self.start + n)

        def __iter__(self):
            nonlocal fail_at
            opened.append(self.start)
            for i in range(self.start, len(rows)):
                if i == fail_at:
                    fail_at = next(failures, None)
                    raise ConnectionResetError(104, "Connection reset by peer")
                yield rows[i]

    monkeypatch.setattr(streams, "_open_stream", lambda stream, revision: Fake())
    got = list(streams.iter_stream(streams.Stream("hub", "x/y", None, "train"), None, "text", 1))
    assert got == [f"doc {i}" for i in range(1, 10)] and opened == [1, 3, 7]
    assert capsys.readouterr().err.count("reopening there") == 2

    def full_disk(stream, revision):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(streams, "_open_stream", full_disk)
    with pytest.raises(prep.PrepareError, match="No space"):  # not transient: no retry, one line
        list(streams.iter_stream(streams.Stream("hub", "x/y", None, "train"), None, "text", 0))


def test_processes_downloading_one_file_take_turns(tmp_path, monkeypatch):
    """Ranks fetching one asset at once: one downloads, the others find it published."""
    from concurrent.futures import ThreadPoolExecutor

    from gpt2repro.files.download import download

    data = os.urandom(300_000)
    with LocalHub() as h:
        url = h.serve_file("f.bin", data)
        with ThreadPoolExecutor(4) as pool:
            paths = list(pool.map(lambda _: download(url, tmp_path / "f.bin", size=len(data)), range(4)))
        assert len([r for r in h.log if r[0] == "GET"]) == 1
    assert all(p.read_bytes() == data for p in paths)


def test_a_try_that_brought_bytes_does_not_count_against_the_cap(tmp_path, monkeypatch):
    """Four resets in a row on a 1 MiB file, each after half of what was left arrived, with 3 tries
    allowed: every try made headway, so the download goes on, resuming each time where it stopped."""
    from gpt2repro.files.download import download

    monkeypatch.setenv("GPT2REPRO_DOWNLOAD_RETRIES", "3")
    monkeypatch.setenv("GPT2REPRO_DOWNLOAD_BACKOFF", "0.01")
    data = os.urandom(1 << 20)
    with LocalHub() as h:
        url = h.serve_file("big.bin", data)
        h.faults = Faults(plan=["reset"] * 4)
        path = download(url, tmp_path / "big.bin", size=len(data), sha256=hashlib.sha256(data).hexdigest())
        starts = [int(r[3][6:-1]) if r[3] else 0 for r in h.requests("big.bin")]
    assert path.read_bytes() == data and h.faults.injected["reset"] == 4
    assert starts == sorted(starts) and len(set(starts)) == 5  # each try resumed further on


def test_a_host_that_does_not_resolve_fails_at_once(tmp_path, capsys):
    """An offline machine (no DNS) is told now, not after ten tries: no retry line, one error."""
    from gpt2repro.files.download import download

    start = time.monotonic()
    with pytest.raises(Exception, match="nowhere.invalid") as caught:
        download("http://nowhere.invalid/f.bin", tmp_path / "f.bin")
    assert time.monotonic() - start < 10 and "retry" not in capsys.readouterr().err
    assert "NameResolution" in str(caught.value) or "resolve" in str(caught.value)
