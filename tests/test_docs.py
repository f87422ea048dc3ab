"""The README and docs/ say only what the CLI does: every `gpt2repro …` command in a fenced block
parses with the real argument parser (a removed flag or subcommand fails here), every `--flag` a
command's inline or table spelling names is one its subcommand lists in `--help`, and every
relative link points at a file that exists. Every block of commands is marked: `<!-- docs: run -->`
blocks are run, in page order, at tiny scale (`<!-- docs: run; OLD => NEW -->` substitutes tiny
sizes or paths first); blocks that need a GPU or the network say so (`<!-- docs: gpu -->`,
`<!-- docs: network -->`) and are only parsed."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from conftest import shared_file
from gpt2repro.cli import main
from gpt2repro.cliargs import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
MARKED = re.compile(
    r"<!-- docs: (run|gpu|network)((?:; [^;]+ => [^;]+?)*) -->\n```[^\n]*\n(.*?)^```", re.S | re.M
)
INLINE = re.compile(r"`(gpt2repro [^`]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def commands(block: str) -> list[str]:
    """The gpt2repro commands of a shell block: continuation lines joined, comments, redirections
    and pipes cut off; `torchrun … -m gpt2repro` and `python -m gpt2repro` taken as `gpt2repro`."""
    joined = re.sub(r"\\\n\s*", " ", block)
    found = []
    for line in joined.splitlines():
        line = re.split(r"\s#\s|^#", line, maxsplit=1)[0].strip()
        line = re.split(r"\s(?:>|\||&&|;)\s", line, maxsplit=1)[0]
        m = re.search(r"(?:^|\s)(?:-m |\S*/)?gpt2repro(\s.*)$", line)
        if m and not line.startswith(("pip ", "cd ", "git ")):
            found.append("gpt2repro" + m[1])
    return found


def fenced_commands() -> list[tuple[str, str]]:
    return [
        (f"{page.relative_to(ROOT)}", cmd)
        for page in PAGES
        for block in FENCE.findall(page.read_text(encoding="utf-8"))
        for cmd in commands(block)
    ]


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    """The deepest subcommand's parser that `words` name (`eval hellaswag` → its parser)."""
    for word in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    return parser


def test_the_pages_hold_commands_to_check():
    assert len(fenced_commands()) >= 20  # the extraction itself works


@pytest.mark.parametrize(
    "where, command", fenced_commands(), ids=lambda v: v if "/" in v or v.endswith(".md") else None
)
def test_every_documented_command_parses(where, command):
    parser = build_parser()
    argv = shlex.split(command)[1:]
    try:
        parser.parse_args(argv)
    except SystemExit as e:
        assert e.code == 0, f"{where}: `{command}` does not parse (a flag or subcommand the CLI lacks)"


def documented_flags() -> list[tuple[str, str, str]]:
    """(page, command words, --flag) for every flag named after `gpt2repro SUB [SUB]` in inline code."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        spans = INLINE.findall(text) + [c for block in FENCE.findall(text) for c in commands(block)]
        for span in spans:
            words = re.findall(r"^gpt2repro((?: [a-z][a-z-]*)+)", span)
            for flag in set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", span)):
                found.append((f"{page.relative_to(ROOT)}", words[0].strip() if words else "", flag))
    return sorted(set(found))


def test_every_documented_flag_is_one_help_lists():
    parser, missing = build_parser(), []
    for page, words, flag in documented_flags():
        sub = _subparser(parser, words.split())
        if flag not in sub._option_string_actions:
            missing.append(f"{page}: `gpt2repro {words}` documents {flag}, which its --help does not list")
    assert missing == []


def test_relative_links_point_at_files_that_exist():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_every_block_of_commands_is_run_or_says_what_it_needs():
    unmarked = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        marked = {m.group(3) for m in MARKED.finditer(text)}
        unmarked += [
            f"{page.relative_to(ROOT)}: {b.splitlines()[0][:60]}"
            for b in FENCE.findall(text)
            if commands(b) and b not in marked
        ]
    assert unmarked == []


@pytest.mark.slow
def test_the_run_blocks_run_at_tiny_scale(tmp_path, monkeypatch, capsys):
    """README's CPU quick start and every other `run` block, as a reader would type them, in one
    directory: each command exits 0 (a `serve` is started, answers /health, and is stopped)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tinyshakespeare.txt").write_bytes(shared_file("tinyshakespeare.txt").read_bytes())
    ran, redirect = [], None
    for page in PAGES:
        for kind, subs, block in MARKED.findall(page.read_text(encoding="utf-8")):
            if kind != "run":
                continue
            for sub in filter(None, subs.split("; ")):
                old, new = sub.split(" => ")
                block = block.replace(old, new)
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = re.split(r"\s#\s|^#", line, maxsplit=1)[0].strip()
                if not line.startswith("gpt2repro "):
                    continue
                command, _, redirect = (p.strip() for p in line.partition(">"))
                argv = shlex.split(command)[1:]
                if argv[0] == "serve":
                    _serve_and_stop(argv)
                else:
                    code = main(argv)
                    out = capsys.readouterr().out
                    assert code in (0, None), f"{page.name}: `{line}` exited {code}"
                    if redirect:
                        (tmp_path / redirect).write_text(out)
                ran.append(argv[0])
    assert {"prepare", "train", "eval", "sample", "export", "presets", "serve"} <= set(ran)


def _serve_and_stop(argv: list[str]) -> None:
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [str(port) if prev == "--port" else a for prev, a in zip([None, *argv], argv)]
    proc = subprocess.Popen([sys.executable, "-m", "gpt2repro", *argv], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"`gpt2repro {' '.join(argv)}` never answered /health")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
