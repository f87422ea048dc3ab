"""`gpt2repro bench`: measured speed, never timed tests (see benchmarks/RESULTS.md).

`runners` measures; `reference` holds the yardsticks it measures against. Training never imports
this package."""
