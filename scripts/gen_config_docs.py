"""Rewrite what is generated from the code's presets and key meanings: configs/*.toml (as
`gpt2repro presets NAME` prints them), the key table of docs/config.md, and docs/training.md's rows of
config keys (the Muon recipe's). tests/test_configfile.py fails until this has been run after a change."""

from __future__ import annotations

import re
from pathlib import Path

from gpt2repro.config.configfile import keys_table, to_toml
from gpt2repro.config.presets import train_config

ROOT = Path(__file__).resolve().parents[1]
USER_PRESETS = ("gpt2-124m-10B", "gpt2-124m-40B", "gpt2-124m-muon", "finetune", "sft", "cpu-demo")


def main() -> None:
    for name in USER_PRESETS:
        (ROOT / "configs" / f"{name}.toml").write_text(to_toml(train_config(name), f"presets {name}"))
    table = keys_table(markdown=True)
    rows = {line.split("`")[1]: line for line in table.splitlines()[2:]}
    doc = ROOT / "docs" / "config.md"
    head = doc.read_text().split("| key | type | default | meaning |")[0]
    doc.write_text(head + table + "\n")
    readme = ROOT / "docs" / "training.md"
    lines = readme.read_text().split("\n")
    for i, line in enumerate(lines):
        key = re.match(r"\| `([\w.]+)` \|", line)
        if key and key[1] in rows:
            lines[i] = rows[key[1]]
    readme.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
