"""The tokenizer against tiktoken's own r50k_base registry entry, and asset resolution."""

import gzip
import hashlib
import os

import pytest
import tiktoken

from conftest import current_umask, shared_file
from gpt2repro.files import assets
from gpt2repro.text.tokenizer import GPT2_PATTERN, get_tokenizer

TEXTS = [
    "Hello, I'm a language model,",
    "   many    spaces\t\ttabs\r\n\r\nCRLF",
    "numbers: 0 12 345 6789 3.14159 1,000,000 2024-05-20",
    "unicode: café naïve Ωμέγα Привет 日本語 한국어 😀🚀 \u200b\u00a0",
    "contractions: it's they'll we've I'd DON'T can't",
    "trailing whitespace   ",
    "",
]


@pytest.fixture(scope="module")
def tiktoken_r50k(tmp_path_factory):
    """tiktoken's built-in r50k_base (== gpt2 ranks and regex), fed our rank file through its cache."""

    rank_file = shared_file("gpt2.tiktoken")
    cache = tmp_path_factory.mktemp("tiktoken")
    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(rank_file.read_bytes())
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        import tiktoken.registry

        tiktoken.registry.ENCODINGS.pop("r50k_base", None)
        return tiktoken.get_encoding("r50k_base")
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR")
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def test_same_regex_as_tiktoken():
    from tiktoken_ext.openai_public import r50k_pat_str

    assert GPT2_PATTERN == r50k_pat_str


def test_encodes_exactly_like_tiktoken(enc, tiktoken_r50k):
    assert enc.n_vocab == tiktoken_r50k.n_vocab == 50257
    for text in TEXTS:
        assert enc.encode_ordinary(text) == tiktoken_r50k.encode_ordinary(text), text
        assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]


def test_endoftext_handling(enc, tiktoken_r50k):
    text = "end<|endoftext|>start"
    assert enc.encode(text, allowed_special="all") == tiktoken_r50k.encode(text, allowed_special="all")
    assert 50256 in enc.encode(text, allowed_special="all")
    assert 50256 not in enc.encode_ordinary(text)
    with pytest.raises(ValueError):
        enc.encode(text)  # disallowed special tokens are refused, as in tiktoken
    assert enc.eot_token == 50256


# ---- assets ----

CONTENT = b"hello asset\n" * 100


@pytest.fixture
def fake_asset(monkeypatch, tmp_path):
    """A registered asset whose official URL is a local file:// we control."""
    source = tmp_path / "origin" / "thing.txt"
    source.parent.mkdir()
    source.write_bytes(CONTENT)
    asset = assets.Asset("thing.txt", hashlib.sha256(CONTENT).hexdigest(), len(CONTENT), url=source.as_uri())
    monkeypatch.setitem(assets.REGISTRY, asset.name, asset)
    monkeypatch.delenv("GPT2REPRO_ASSETS", raising=False)
    monkeypatch.setenv("GPT2REPRO_DOWNLOAD_BACKOFF", "0.01")  # a refused checksum is retried: quickly here
    return source


def test_resolution_prefers_the_mirror(fake_asset, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "thing.txt").write_bytes(CONTENT)
    monkeypatch.setenv("GPT2REPRO_ASSETS", str(mirror))
    fake_asset.unlink()  # the URL would fail now
    assert assets.fetch("thing.txt") == mirror / "thing.txt"


def test_gzip_mirror_is_decompressed_verified_and_cached(fake_asset, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "thing.txt.gz").write_bytes(gzip.compress(CONTENT))
    monkeypatch.setenv("GPT2REPRO_ASSETS", str(mirror))
    path = assets.fetch("thing.txt")
    assert path == assets.cache_dir() / "thing.txt" and path.read_bytes() == CONTENT
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert [p.name for p in assets.cache_dir().iterdir()] == ["thing.txt"]  # no temporary left


def test_download_then_cache_reuse(fake_asset):
    path = assets.fetch("thing.txt")
    assert path == assets.cache_dir() / "thing.txt" and path.read_bytes() == CONTENT
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # not mkstemp's private 0600
    fake_asset.unlink()  # no source any more: the cache serves it
    assert assets.fetch("thing.txt", allow_download=False) == path


def test_checksum_mismatch_refuses_and_never_caches(fake_asset):
    fake_asset.write_bytes(b"t" * len(CONTENT))  # tampered, the same length
    with pytest.raises(
        assets.AssetError,
        match="thing.txt: gave up after 10 tries .*sha256 mismatch: expected [0-9a-f]{64}, got",
    ):
        assets.fetch("thing.txt")
    assert list(assets.cache_dir().iterdir()) == []  # neither the file nor a temporary copy


def test_bad_mirror_file_is_refused(fake_asset, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "thing.txt").write_bytes(b"wrong bytes")
    monkeypatch.setenv("GPT2REPRO_ASSETS", str(mirror))
    with pytest.raises(assets.AssetError, match=f"{mirror / 'thing.txt'}: sha256 mismatch"):
        assets.fetch("thing.txt")


def test_missing_everywhere_is_one_clear_error(fake_asset):
    fake_asset.unlink()
    with pytest.raises(assets.AssetError, match="thing.txt not found in .*could not download"):
        assets.fetch("thing.txt")
    with pytest.raises(assets.AssetError, match="unknown asset"):
        assets.fetch("nope.bin")


def test_registered_shared_files_verify():
    for name in ("gpt2.tiktoken", "tinyshakespeare.txt"):
        shared_file(name)
        assert assets.fetch(name, allow_download=False).name == name
    shared_file("hellaswag_val.jsonl.gz")
    path = assets.fetch("hellaswag_val.jsonl", allow_download=False)
    assert path.stat().st_size == 12_246_618


def test_tokenizer_refuses_a_wrong_rank_file(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(b"aGVsbG8= 0\n")
    get_tokenizer.cache_clear()
    with pytest.raises(assets.AssetError, match="sha256 mismatch"):
        get_tokenizer(str(bad))
    assert isinstance(get_tokenizer(), tiktoken.Encoding)


def test_pypi_fallback_fetches_the_same_bytes(monkeypatch):
    """gpt2.tiktoken from the openai-whisper sdist, verified; skipped where no package index answers."""
    monkeypatch.delenv("GPT2REPRO_ASSETS", raising=False)
    asset = assets.REGISTRY["gpt2.tiktoken"]
    try:
        path = assets._from_pypi(asset)
    except assets.AssetError as e:
        pytest.skip(f"no package index reachable: {e}")
    assert path == assets.cache_dir() / "gpt2.tiktoken" and assets.sha256_file(path) == asset.sha256
