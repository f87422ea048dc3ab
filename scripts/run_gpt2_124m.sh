#!/usr/bin/env bash
# The real-scale recipe: GPT-2 (124M) on FineWeb-EDU sample-10BT, one node of 8 GPUs.
# Every step is resumable: re-run the same line after an interruption.
set -euo pipefail
DATA=${DATA:-data/edu_fineweb10B}
RUN=${RUN:-runs/gpt2-124m-10B}
NGPU=${NGPU:-8}

# 1. ~10B GPT-2 tokens in 100M-token llm.c shards (val_000000.bin + train_000001.bin ...); ~1 h on 32 cores
gpt2repro prepare --source fineweb-edu --name sample-10BT --out "$DATA"

# 2. 19,073 steps of 524,288 tokens; grad accumulation is 8/NGPU; checkpoints every 5,000 steps
torchrun --standalone --nproc_per_node="$NGPU" -m gpt2repro train --preset gpt2-124m-10B --data "$DATA" --out "$RUN"
#    4 epochs with reshuffling (the run that approaches GPT-3 124M): --preset gpt2-124m-40B
#    several nodes (run on each, R = 0..N-1; HOST = node 0): see also scripts/slurm_gpt2_124m.sbatch
#    torchrun --nnodes=N --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
#      --rdzv_id=gpt2-124m -m gpt2repro train --preset gpt2-124m-10B --data "$DATA" --out "$RUN"

# 3. evaluate, sample, plot, export
gpt2repro eval hellaswag --checkpoint "$RUN" --style both --json "$RUN/hellaswag.json"
gpt2repro sample --checkpoint "$RUN" -n 4 --max-new-tokens 32
gpt2repro plot "$RUN"
gpt2repro export --checkpoint "$RUN" --out "$RUN/hf"
