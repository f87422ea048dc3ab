"""Preparation (round trip, workers, resume, sources) and the loader (ranks, resume, shuffling, errors)."""

import contextlib
import gzip
import json
import os
import tempfile

import numpy as np
import pytest

from conftest import current_umask, shared_file
from gpt2repro.data import prepare as prep
from gpt2repro.data import sources
from gpt2repro.data.loader import DataLoader
from gpt2repro.data.shards import HEADER_BYTES, ShardError, ShardWriter, find_shards, read_shard, write_shard


def fineweb_rows(n: int) -> list[dict]:
    """Rows in the FineWeb-EDU schema (../shared/data/README.md)."""
    words = "the model learns language from data and tokens predict the next word in a sentence".split()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(words, size=rng.integers(20, 200))) + f". Doc {i} — ünïcödé ✓"
        rows.append(
            {
                "text": text,
                "id": f"<urn:uuid:{i:08d}>",
                "dump": "CC-MAIN-2013-20",
                "url": f"http://x/{i}",
                "file_path": "s3://x",
                "language": "en",
                "language_score": 0.9,
                "token_count": 0,
                "score": 3.1,
                "int_score": 3,
            }
        )
    return rows


def write_jsonl(path, rows, compress=False):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def all_tokens(out, manifest):
    return np.concatenate([np.asarray(read_shard(out / s["file"])) for s in manifest["shards"]])


@pytest.fixture(params=["one-unit", "small-units"])
def unit_bytes(request, monkeypatch):
    """Plain jsonl files are split into byte-range units; small ones put many lines across unit
    boundaries (and some units start and end inside one long line)."""
    if request.param == "small-units":
        monkeypatch.setattr(sources, "UNIT_BYTES", 997)
    return sources.UNIT_BYTES


@pytest.mark.parametrize("size", [0, 1, 5, 997, 3 * 997, 3 * 997 + 500])
def test_jsonl_units_cover_the_file_and_shrink_at_its_end(monkeypatch, size):
    monkeypatch.setattr(sources, "UNIT_BYTES", 997)
    bounds = sources._jsonl_bounds(size)
    assert bounds[0] == 0 and bounds[-1] == size and bounds == sorted(set(bounds))
    sizes = np.diff(bounds)
    assert all(sizes[:-4] == 997) and sum(sizes) == size
    if size >= 8:  # the last full-size unit is cut into about 1/2, 1/4, 1/8, 1/8 of itself
        last = size - (size - 1) // 997 * 997
        assert len(sizes) == -(-size // 997) + 3 and sum(sizes[-4:]) == last
        assert [abs(a - last * f) < 1 for a, f in zip(sizes[-4:], (1 / 2, 1 / 4, 1 / 8, 1 / 8))] == [True] * 4


def test_round_trip_equals_tiktoken_with_eot(tmp_path, enc, unit_bytes):
    rows = fineweb_rows(60)
    src = write_jsonl(tmp_path / "docs.jsonl", rows)
    m = prep.prepare([str(src)], tmp_path / "out", shard_tokens=1000, val_tokens=700, progress=False)
    expected = np.concatenate([[50256, *enc.encode_ordinary(r["text"])] for r in rows])
    np.testing.assert_array_equal(all_tokens(tmp_path / "out", m), expected)
    assert m["total_tokens"] == len(expected) == sum(s["tokens"] for s in m["shards"])
    assert m["documents"] == 60 and m["complete"]
    assert [s["split"] for s in m["shards"][:2]] == ["val", "train"]
    assert m["shards"][0]["tokens"] == 700 and m["shards"][1]["tokens"] == 1000
    assert m["shards"][0]["file"] == "val_000000.bin" and m["shards"][1]["file"] == "train_000001.bin"
    from gpt2repro.files.fsio import sha256_file

    assert all(sha256_file(tmp_path / "out" / s["file"]) == s["sha256"] for s in m["shards"])


def test_one_and_two_workers_give_identical_shards(tmp_path, enc, unit_bytes):
    src = write_jsonl(tmp_path / "docs.jsonl", fineweb_rows(300))
    m1 = prep.prepare([str(src)], tmp_path / "w1", shard_tokens=5000, workers=1, progress=False)
    m2 = prep.prepare([str(src)], tmp_path / "w2", shard_tokens=5000, workers=2, progress=False)
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]


def test_default_workers_are_the_cpus_this_process_may_use(tmp_path, enc, unit_bytes, monkeypatch):
    """Pinned to one CPU (a container's share, `taskset`) on a host with more: one tokenizer."""
    src = write_jsonl(tmp_path / "docs.jsonl", fineweb_rows(20))
    monkeypatch.setattr(prep.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(prep.os, "cpu_count", lambda: 64)
    used = []
    encoded = prep._encoded_units
    monkeypatch.setattr(prep, "_encoded_units", lambda *a: used.append(a[-1]) or encoded(*a))
    prep.prepare([str(src)], tmp_path / "out", shard_tokens=5000, val_tokens=1000, progress=False)
    assert used == [1]


@contextlib.contextmanager
def crash_on_commit(n: int, torn: bool = False):
    """Inside: the n-th shard commit dies as a kill would (leaving a torn file if `torn`)."""
    real_commit, calls = ShardWriter.commit, {"n": 0}

    def crashing_commit(self):
        calls["n"] += 1
        if calls["n"] == n:
            if torn:
                self.out.path.write_bytes(b"torn")
            raise KeyboardInterrupt
        return real_commit(self)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(ShardWriter, "commit", crashing_commit)
        yield


def test_interrupted_then_resumed_is_byte_identical(tmp_path, enc, monkeypatch, unit_bytes):
    src = write_jsonl(tmp_path / "docs.jsonl", fineweb_rows(300))
    full = prep.prepare([str(src)], tmp_path / "full", shard_tokens=3000, val_tokens=1000, progress=False)
    with crash_on_commit(4, torn=True):  # dies committing shard 3: its temporary and a torn file left
        prep.prepare([str(src)], tmp_path / "resumed", shard_tokens=3000, val_tokens=1000, progress=False)
    partial = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert len(partial["shards"]) == 3 and not partial["complete"]
    assert not list((tmp_path / "resumed").glob(".*.tmp"))  # the interrupted shard's file was removed
    (tmp_path / "resumed" / ".train_000004.bin.x1y2.tmp").write_bytes(b"as a kill -9 leaves it")
    monkeypatch.setattr(sources, "UNIT_BYTES", unit_bytes + 1)  # another version cutting other units
    with pytest.raises(prep.PrepareError, match="cut into units another way"):
        prep.prepare([str(src)], tmp_path / "resumed", shard_tokens=3000, val_tokens=1000, progress=False)
    monkeypatch.setattr(sources, "UNIT_BYTES", unit_bytes)
    resumed = prep.prepare(
        [str(src)], tmp_path / "resumed", shard_tokens=3000, val_tokens=1000, progress=False
    )
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in full["shards"]]
    assert resumed["total_tokens"] == full["total_tokens"] and resumed["documents"] == full["documents"]
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == sorted(
        p.name for p in (tmp_path / "full").iterdir()
    )


def test_a_full_disk_keeps_what_was_committed_and_leaves_no_temporary_files(tmp_path, enc, monkeypatch):
    src = write_jsonl(tmp_path / "docs.jsonl", fineweb_rows(300))
    args = dict(shard_tokens=3000, val_tokens=1000, progress=False, workers=2)
    real_write, calls = ShardWriter.write, {"n": 0}

    def filling_disk(self, tokens):
        calls["n"] += 1
        if calls["n"] == 6:
            raise OSError(28, "No space left on device")
        return real_write(self, tokens)

    monkeypatch.setattr(ShardWriter, "write", filling_disk)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    with pytest.raises(
        prep.PrepareError, match="No space left on device while writing shards; the .* shards committed"
    ):
        prep.prepare([str(src)], tmp_path / "out", **args)
    assert not list((tmp_path / "out").glob(".*.tmp")) and not list((tmp_path / "scratch").iterdir())
    committed = json.loads((tmp_path / "out" / "manifest.json").read_text())["shards"]
    assert committed and all((tmp_path / "out" / s["file"]).is_file() for s in committed)
    monkeypatch.undo()
    full = prep.prepare([str(src)], tmp_path / "full", **args)
    resumed = prep.prepare([str(src)], tmp_path / "out", **args)  # space freed: the same command resumes
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in full["shards"]]


def test_resume_refuses_an_input_that_changed_meanwhile(tmp_path, enc, monkeypatch):
    src = write_jsonl(tmp_path / "docs.jsonl", fineweb_rows(300))
    args = dict(shard_tokens=3000, val_tokens=1000, progress=False)
    with crash_on_commit(3):
        prep.prepare([str(src)], tmp_path / "out", **args)
    manifest_before = (tmp_path / "out" / "manifest.json").read_text()
    stat = src.stat()
    text = src.read_text()
    src.write_text(text.replace("a", "b", 1))  # same size, same mtime: only the content moved
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(prep.PrepareError, match="docs.jsonl changed since the interrupted preparation"):
        prep.prepare([str(src)], tmp_path / "out", **args)
    assert (tmp_path / "out" / "manifest.json").read_text() == manifest_before  # nothing mixed in
    src.write_text(text)
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    full = prep.prepare([str(src)], tmp_path / "full", **args)
    resumed = prep.prepare([str(src)], tmp_path / "out", **args)  # the original input back: resumes
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in full["shards"]]


@pytest.mark.parametrize("kind", ["parquet", "jsonl.gz"])
def test_units_of_parquet_row_groups_and_gzip_batches_resume_exactly(tmp_path, monkeypatch, enc, kind):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = fineweb_rows(120)
    monkeypatch.setattr(sources, "BATCH_DOCS", 7)
    if kind == "parquet":
        src = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), src, row_group_size=7)
        assert pq.ParquetFile(src).num_row_groups == 18
    else:
        src = write_jsonl(tmp_path / "d.jsonl.gz", rows, compress=True)
    reference = prep.prepare(
        [str(write_jsonl(tmp_path / "d.jsonl", rows))], tmp_path / "ref", shard_tokens=2500, progress=False
    )
    with crash_on_commit(3):
        prep.prepare([str(src)], tmp_path / "o", shard_tokens=2500, workers=2, progress=False)
    resumed = prep.prepare([str(src)], tmp_path / "o", shard_tokens=2500, workers=2, progress=False)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert resumed["documents"] == 120


def test_finished_preparation_does_nothing(tmp_path, enc, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", fineweb_rows(5))
    prep.prepare([str(src)], tmp_path / "o", shard_tokens=500, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").iterdir()}
    prep.prepare([str(src)], tmp_path / "o", shard_tokens=500, progress=False)
    assert "already complete" in capsys.readouterr().out
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").iterdir()}
    with pytest.raises(prep.PrepareError, match="different arguments"):
        prep.prepare([str(src)], tmp_path / "o", shard_tokens=400, progress=False)


def test_max_tokens_stops_exactly(tmp_path, enc):
    src = write_jsonl(tmp_path / "d.jsonl", fineweb_rows(100))
    m = prep.prepare(
        [str(src)], tmp_path / "o", shard_tokens=1000, val_tokens=500, max_tokens=2600, progress=False
    )
    assert m["total_tokens"] == 2600 and [s["tokens"] for s in m["shards"]] == [500, 1000, 1000, 100]


def test_workers_leave_no_scratch_or_temporary_files(tmp_path, enc, monkeypatch):
    """Worker results pass through scratch files; none may outlive a run that ends early (max_tokens
    with units still in flight) or fails (a malformed row), nor may a half-written shard."""
    monkeypatch.setattr(sources, "UNIT_BYTES", 997)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    rows = fineweb_rows(300)
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    full = prep.prepare([str(src)], tmp_path / "full", shard_tokens=1000, workers=2, progress=False)
    m = prep.prepare(
        [str(src)], tmp_path / "o", shard_tokens=1000, max_tokens=2500, workers=2, progress=False
    )
    assert m["total_tokens"] == 2500 and full["total_tokens"] > 10 * 2500
    lines = src.read_text().splitlines()
    lines[250] = "{not json"
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(prep.PrepareError, match=r"bad.jsonl:251: not valid JSON"):
        prep.prepare(
            [str(tmp_path / "bad.jsonl")], tmp_path / "bad", shard_tokens=1000, workers=2, progress=False
        )
    assert not list((tmp_path / "scratch").iterdir())
    assert not [p for d in ("full", "o", "bad") for p in (tmp_path / d).iterdir() if p.suffix == ".tmp"]


def test_parquet_jsonl_gz_and_txt_sources_agree(tmp_path, enc):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = fineweb_rows(40)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    write_jsonl(tmp_path / "d.jsonl.gz", rows, compress=True)
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, r in enumerate(rows):
        (txt_dir / f"{i:03d}.txt").write_text(r["text"], encoding="utf-8")
    hashes = []
    for name, src in [
        ("pq", tmp_path / "d.parquet"),
        ("gz", tmp_path / "d.jsonl.gz"),
        ("txt", txt_dir / "*.txt"),
    ]:
        m = prep.prepare([str(src)], tmp_path / name, shard_tokens=100_000, val_tokens=0, progress=False)
        hashes.append([s["sha256"] for s in m["shards"]])
        assert m["documents"] == 40
    assert hashes[0] == hashes[1] == hashes[2]


def test_hf_datasets_and_directories_as_sources(tmp_path, enc, monkeypatch):
    """A directory of parquet files, a save_to_disk directory and `hf:` (the hub code path, offline
    on a local directory) give the shards a single local file gives; streams resume exactly."""
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = fineweb_rows(120)
    args = dict(shard_tokens=2500, val_tokens=500, progress=False)
    reference = prep.prepare([str(write_jsonl(tmp_path / "d.jsonl", rows))], tmp_path / "ref", **args)
    parquet_dir = tmp_path / "parquet"
    parquet_dir.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:50]), parquet_dir / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[50:]), parquet_dir / "part-1.parquet")
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    for label, source in [("dir", str(parquet_dir)), ("hub", f"hf:{parquet_dir}"), ("disk", str(saved))]:
        m = prep.prepare([source], tmp_path / label, **args)
        assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in reference["shards"]], label
        assert m["documents"] == 120
    with crash_on_commit(2):
        prep.prepare([str(saved)], tmp_path / "resumed", **args)
    resumed = prep.prepare([str(saved)], tmp_path / "resumed", **args)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in reference["shards"]]
    with pytest.raises(prep.PrepareError, match="no split 'test' \\(splits: train\\)"):
        prep.prepare([str(saved)], tmp_path / "bad-split", split="test", **args)
    with pytest.raises(prep.PrepareError, match="no column 'body' \\(columns: text, id"):
        prep.prepare([f"hf:{parquet_dir}"], tmp_path / "bad-field", text_field="body", **args)


def test_real_c4_sample_and_tiny_shakespeare(tmp_path, enc):
    c4 = shared_file("c4-sample")
    shakespeare = shared_file("tinyshakespeare.txt")
    m = prep.prepare(
        [str(c4 / "*.json.gz"), str(shakespeare)], tmp_path / "o", shard_tokens=100_000, progress=False
    )
    docs = []
    for f in sorted(c4.glob("*.json.gz")):
        docs += [json.loads(line)["text"] for line in gzip.open(f, "rt") if line.strip()]
    assert m["documents"] == len(docs) + 1 == 31
    expected = sum(len(enc.encode_ordinary(d)) + 1 for d in docs + [shakespeare.read_text()])
    assert m["total_tokens"] == expected


def test_bad_sources_fail_with_a_line_number(tmp_path, enc, unit_bytes):
    bad = tmp_path / "bad.jsonl"
    good = "".join(json.dumps(r) + "\n" for r in fineweb_rows(30)) + "\n"  # 30 rows, a blank line
    bad.write_text(good + '{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(prep.PrepareError, match=r"bad.jsonl:33: not valid JSON"):
        prep.prepare([str(bad)], tmp_path / "o1", progress=False)
    bad.write_text(good + '{"text": "fine"}\n{"content": "x"}\n')
    with pytest.raises(prep.PrepareError, match=r"bad.jsonl:33: no string field 'text'"):
        prep.prepare([str(bad)], tmp_path / "o2", progress=False)
    with pytest.raises(prep.PrepareError, match="no such file"):
        prep.prepare([str(tmp_path / "missing.jsonl")], tmp_path / "o3", progress=False)
    gz = tmp_path / "bad.jsonl.gz"  # gzip units hold the line numbers; blank lines still count
    gz.write_bytes(gzip.compress(b'{"text": "a"}\n\n\n{"text": "b"}\n{"text": broken\n'))
    with pytest.raises(prep.PrepareError, match=r"bad.jsonl.gz:5: not valid JSON"):
        prep.prepare([str(gz)], tmp_path / "o5", progress=False)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(prep.PrepareError, match="unsupported file type"):
        prep.prepare([str(tmp_path / "x.csv")], tmp_path / "o4", progress=False)


def test_fineweb_offline_fails_at_once(tmp_path, monkeypatch, enc):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(prep.PrepareError, match="cannot stream HuggingFaceFW/fineweb-edu"):
        prep.prepare(["fineweb-edu"], tmp_path / "o", progress=False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens: refused at once
    with pytest.raises(prep.PrepareError, match="127.0.0.1:9 unreachable"):
        prep.prepare(["fineweb-edu"], tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


# ---- shards ----


def test_shard_format_is_llm_c(tmp_path):
    tokens = np.array([1, 2, 65535, 50256], dtype=np.uint16)
    path = write_shard(tmp_path / "train_000000.bin", tokens)
    raw = path.read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert list(header[:3]) == [20240520, 1, 4] and not header[3:].any()
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").tolist() == tokens.tolist()


def test_shard_writer_streams_and_exposes_only_complete_shards(tmp_path):
    path = write_shard(tmp_path / "train_000000.bin", np.arange(10))
    before = path.read_bytes()
    writer = ShardWriter(path)
    writer.write(np.arange(5, dtype=np.uint16))
    writer.write(np.array([65535, 0]))
    assert path.read_bytes() == before  # nothing visible before commit
    with pytest.raises(ShardError, match="must be in"):
        writer.write(np.array([70000]))
    writer.commit()
    assert np.asarray(read_shard(path)).tolist() == [0, 1, 2, 3, 4, 65535, 0]
    with pytest.raises(ShardError, match="must be in"):
        write_shard(path, np.array([1, -1]))
    assert np.asarray(read_shard(path)).tolist() == [0, 1, 2, 3, 4, 65535, 0]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    assert (
        path.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    )  # readable like any file, not mkstemp's 0600


def test_npy_shards_from_build_nanogpt_load(tmp_path):
    np.save(tmp_path / "edufineweb_train_000001.npy", np.arange(5000, dtype=np.uint16))
    np.save(tmp_path / "edufineweb_val_000000.npy", np.arange(3000, dtype=np.uint16))
    assert [p.name for p in find_shards(tmp_path, "train")] == ["edufineweb_train_000001.npy"]
    x, y = DataLoader(tmp_path, "train", 2, 8).next_batch()
    assert x[0, :3].tolist() == [0, 1, 2] and y[0, :3].tolist() == [1, 2, 3]


def test_bad_shards_are_named(tmp_path):
    write_shard(tmp_path / "train_000000.bin", np.arange(100))
    good = (tmp_path / "train_000000.bin").read_bytes()
    (tmp_path / "magic.bin").write_bytes(np.array([123], "<i4").tobytes() + good[4:])
    with pytest.raises(ShardError, match="magic.bin: bad magic number 123"):
        read_shard(tmp_path / "magic.bin")
    (tmp_path / "version.bin").write_bytes(good[:4] + np.array([7], "<i4").tobytes() + good[8:])
    with pytest.raises(ShardError, match="unsupported shard version 7"):
        read_shard(tmp_path / "version.bin")
    (tmp_path / "trunc.bin").write_bytes(good[:-10])
    with pytest.raises(ShardError, match="trunc.bin: header says 100 tokens"):
        read_shard(tmp_path / "trunc.bin")
    (tmp_path / "short.bin").write_bytes(good[:100])
    with pytest.raises(ShardError, match="truncated"):
        read_shard(tmp_path / "short.bin")
    with pytest.raises(ShardError, match="no such shard"):
        read_shard(tmp_path / "none.bin")
    with pytest.raises(ShardError, match="token values must be in"):
        write_shard(tmp_path / "big.bin", np.array([70000]))


def test_loader_errors(tmp_path):
    with pytest.raises(ShardError, match="no 'train' shards"):
        DataLoader(tmp_path, "train", 2, 8)
    write_shard(tmp_path / "train_000000.bin", np.arange(100))
    with pytest.raises(ShardError, match=r"B\*T\+1 = 201 tokens \(largest has 100\)"):
        DataLoader(tmp_path, "train", 4, 50)
    loader = DataLoader(tmp_path, "train", 2, 8, vocab_size=20)  # no pass over the shards at start
    loader.next_batch()  # tokens 0..16
    with pytest.raises(ShardError, match=r"train_000000.bin: token id 32 >= vocab_size 20 \(tokens 16..32\)"):
        loader.next_batch()
    with pytest.raises(ShardError, match="does not exist"):
        DataLoader(tmp_path / "nowhere", "train", 2, 8)


# ---- loader ----


@pytest.fixture(scope="module")
def loader_dir(tmp_path_factory):
    """Three train shards of different lengths whose tokens are their own global positions mod 60000."""
    d = tmp_path_factory.mktemp("loader")
    start = 0
    for i, n in enumerate([1000, 1700, 650]):
        write_shard(d / f"train_{i + 1:06d}.bin", (np.arange(start, start + n) % 60000))
        start += n
    write_shard(d / "val_000000.bin", np.arange(500))
    return d


def windows(loader, n):
    return [tuple(loader.next_batch()[0][0, :2].tolist()) for _ in range(n)]


def test_ranks_are_disjoint_and_cover_the_epoch(loader_dir):
    single = DataLoader(loader_dir, "train", 2, 16)
    epoch = set(windows(single, single.steps_per_epoch))
    assert len(epoch) == single.steps_per_epoch == (999 // 32) + (1699 // 32) + (649 // 32)
    for shuffle in (False, True):
        ranks = [
            DataLoader(loader_dir, "train", 2, 16, rank=r, world_size=3, shuffle=shuffle) for r in range(3)
        ]
        seen = [set(windows(ld, ld.steps_per_epoch)) for ld in ranks]
        assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1 :])
        union = set().union(*seen)
        assert union <= epoch and len(union) == 3 * ranks[0].steps_per_epoch >= len(epoch) - 2


def _steps(loaders, steps, accum):
    """The set of windows each optimizer step takes over all ranks."""
    return [{w for ld in loaders for w in windows(ld, accum)} for _ in range(steps)]


@pytest.mark.parametrize("shuffle", [False, True])
def test_steps_take_the_same_windows_on_any_number_of_ranks(loader_dir, shuffle):
    """4 windows per step as 1 rank x 4 micro-batches, 2 x 2 or 4 x 1; across an epoch boundary."""

    def loaders(world):
        return [
            DataLoader(loader_dir, "train", 2, 16, r, world, shuffle, seed=3, step_windows=4)
            for r in range(world)
        ]

    one = loaders(1)
    n = one[0].steps_per_epoch // 4 + 3  # into the second epoch
    reference = _steps(one, n, 4)
    assert all(len(s) == 4 for s in reference)
    assert _steps(loaders(2), n, 2) == reference and _steps(loaders(4), n, 1) == reference
    # resume: 5 steps on 2 ranks, the rest on 1, then on 4
    two = loaders(2)
    first = _steps(two, 5, 2)
    single = loaders(1)
    single[0].load_state_dict(json.loads(json.dumps(two[0].state_dict())))
    middle = _steps(single, 5, 4)
    four = loaders(4)
    for ld in four:
        ld.load_state_dict(single[0].state_dict())
    assert first + middle + _steps(four, n - 10, 1) == reference


def test_targets_are_inputs_shifted_by_one(loader_dir):
    x, y = DataLoader(loader_dir, "train", 3, 16, shuffle=True).next_batch()
    assert x.dtype == y.dtype and x.shape == y.shape == (3, 16)
    assert (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()


def test_restored_state_yields_the_same_batches(loader_dir):
    a = DataLoader(loader_dir, "train", 2, 16, shuffle=True, seed=5)
    n = a.steps_per_epoch
    windows(a, n + 7)  # into the second epoch
    b = DataLoader(loader_dir, "train", 2, 16, shuffle=True, seed=5)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert windows(a, 2 * n) == windows(b, 2 * n)
    c = DataLoader(loader_dir, "train", 2, 8, shuffle=True, seed=5)
    with pytest.raises(ValueError, match="loader state has seq_len=16 but this loader has 8"):
        c.load_state_dict(a.state_dict())


def test_epochs_reshuffle_with_the_seed(loader_dir):
    a = DataLoader(loader_dir, "train", 2, 16, shuffle=True, seed=1)
    n = a.steps_per_epoch
    e0, e1 = windows(a, n), windows(a, n)
    assert set(e0) == set(e1) and e0 != e1
    same = DataLoader(loader_dir, "train", 2, 16, shuffle=True, seed=1)
    other = DataLoader(loader_dir, "train", 2, 16, shuffle=True, seed=2)
    assert windows(same, n) == e0 and windows(other, n) != e0
    plain = DataLoader(loader_dir, "train", 2, 16)
    assert windows(plain, 3) == [(0, 1), (32, 33), (64, 65)]


def test_val_is_identical_across_calls(loader_dir):
    v = DataLoader(loader_dir, "val", 2, 16, rank=1, world_size=2)
    first = windows(v, 4)
    v.reset()
    assert windows(v, 4) == first
