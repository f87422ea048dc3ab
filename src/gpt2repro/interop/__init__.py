"""Other formats' models: Hugging Face `transformers` directories loaded and exported, and
`load_pretrained` for any source of weights (`hf`); the GGUF file llama.cpp, Ollama and LM Studio
load (`gguf_export`)."""
