#!/usr/bin/env bash
# Every number in benchmarks/RESULTS.md comes from these commands (medians after warm-up; JSON beside).
set -euo pipefail
cd "$(dirname "$0")/.."
B=.venv/bin/gpt2repro
OUT=benchmarks/results
mkdir -p "$OUT"
$B bench peak --repeats 7 --json "$OUT/peak.json"
$B bench train --size 4x256 --baseline all --repeats 5 --json "$OUT/train_tiny.json"
$B bench train --size 6x384 --mode bf16,compile-bf16,eager --baseline reference --repeats 5 --json "$OUT/train_small.json"
$B bench train --size 124m --mode bf16,eager --baseline reference --repeats 3 --json "$OUT/train_124m.json"
$B bench generate --size 6x384 --repeats 3 --json "$OUT/generate.json"
# llama.cpp beside us needs llama-cpp-python (pip install '.[gguf-check]': builds llama.cpp from source)
if .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
    $B bench generate --size 124m --baseline llama.cpp --repeats 3 --json "$OUT/generate_llamacpp.json"
else
    echo "llama-cpp-python absent: skipping bench generate --baseline llama.cpp"
fi
$B bench chat --repeats 15 --json "$OUT/chat.json"
$B bench hellaswag --size 6x384 --repeats 3 --json "$OUT/hellaswag.json"
$B bench prepare --repeats 9 --json "$OUT/prepare.json"
$B bench memory --size 124m --json "$OUT/memory_124m.json"
$B bench learn --presets cpu-tiny --steps 60 --seeds 2 --lr-factors 0.25,0.5,1,2 --recipe muon_lr=6e-3 --recipe muon_split_qkv=false --plot "$OUT/learn_cpu_tiny.png" --json "$OUT/learn_cpu_tiny.json"
$B bench learn --presets cpu-demo --steps 60 --seeds 2 --lr-factors 0.5,1,2 --set total_batch_size=2048 --set micro_batch_size=8 --set seq_len=128 --recipe muon_lr=8e-3 --recipe muon_split_qkv=false --plot "$OUT/learn_cpu_demo.png" --json "$OUT/learn_cpu_demo.json"
$B bench serve --size 4x256 --repeats 3 --json "$OUT/serve.json"
