"""The network and how it runs: GPT-2 in one file with HF parameter names and strict state loading
(`gpt`), the hand-written kernels it uses (`ops`), the KV cache (`kvcache`), and dtype names, the
autocast context and TF32 (`precision`). It knows neither data nor training."""
