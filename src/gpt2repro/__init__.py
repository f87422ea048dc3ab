"""gpt2repro: GPT-2 reproduced from scratch in PyTorch."""

__version__ = "0.1.0"
