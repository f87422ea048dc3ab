"""gpt2repro: GPT-2 reproduced from scratch in PyTorch.

`gpt2repro.load(source)` gives an `LLM` to generate, stream, chat, score and export with (`api`);
the names are imported when first used, so `import gpt2repro` stays light."""

__version__ = "0.1.0"
__all__ = ["LLM", "__version__", "load"]


def __getattr__(name: str):
    if name in ("LLM", "load"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'gpt2repro' has no attribute {name!r}")
