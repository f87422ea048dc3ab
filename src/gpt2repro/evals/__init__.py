"""`gpt2repro eval`: HellaSwag in both conventions (`hellaswag`, its output `report`), the CORE metric
(`core_data` reads DCLM's bundle, `core` scores it) over shared-prefix rows packed into few forward
passes (`packing`), a chat model on held-out conversations (`chat`) and lm-evaluation-harness tasks
(`harness`). Training imports `hellaswag` and `core` to evaluate in the loop."""
