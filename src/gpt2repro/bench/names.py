"""The names `gpt2repro bench` takes, in one table each: the CLI builds its choices from them without
importing torch, and the runners look them up."""

WHAT = ("peak", "train", "generate", "hellaswag", "core", "prepare", "memory", "learn", "chat", "serve")
SIZES = {  # name (layers x width, unlike the model presets' names): (n_layer, n_embd, n_head, B, T)
    "4x256": (4, 256, 4, 8, 256),
    "6x384": (6, 384, 6, 8, 256),
    "12x256": (12, 256, 4, 8, 1024),  # 1,024 tokens: activations, not the loss's buffers, dominate memory
    "124m": (12, 768, 12, 1, 1024),
}
TRAIN_MODES = ("eager", "bf16", "compile", "compile-bf16")
# llama.cpp: `generate` only, batch-1 prompt and decoding speed on our GGUF export (bench/llamacpp.py);
# allocator: `train` only (bench/runners.py, bench_allocator)
BASELINES = {
    "none": [],
    "reference": ["reference"],
    "hf": ["hf"],
    "all": ["reference", "hf"],
    "llama.cpp": ["llama.cpp"],
    "allocator": [],  # `train` on CPU: large tensors from glibc's heap (training's) against its default
}
