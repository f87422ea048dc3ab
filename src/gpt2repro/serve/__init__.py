"""`gpt2repro serve`: the OpenAI-compatible HTTP API and the web page over the batched KV-cache
engine (`engine`), the requests' validation and OpenAI's error bodies (`protocol`), a request's jobs
and its response bodies and chunks (`generation`), what browsers may do (`guard`), the Prometheus
metrics (`metrics`), the ASGI app (`app`) and the server's start and stop (`run`)."""
