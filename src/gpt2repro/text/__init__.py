"""Text and tokens: the GPT-2 BPE (`tokenizer`), the chat format with its tokens, loss masks and
Jinja template (`chat`), and a token's text as it streams, incremental UTF-8, offsets and stop
strings (`tokentext`). Everything that turns text into token ids or back, nothing that runs a model."""
