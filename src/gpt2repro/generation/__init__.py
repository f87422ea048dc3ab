"""Running a model forward to make text: the one sampler and end-of-reply rule every entry point uses
(`sampling`), KV-cache sampling from a prompt (`generate`), the one decoding step every entry point
runs, fast on each host (`decoding`), a conversation held in the KV cache
across turns (`chat_session`) and the terminal chat behind `gpt2repro chat` (`chat_cli`)."""
