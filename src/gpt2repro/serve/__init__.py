"""`gpt2repro serve`: the OpenAI-compatible HTTP API and the web page over the batched KV-cache
engine (`engine`), the requests' validation and OpenAI's error bodies (`protocol`), the text of
streamed tokens (`text`), the ASGI app (`app`) and the server's start and stop (`run`)."""
