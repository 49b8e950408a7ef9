"""Where plans meet inference engines: the backend interface and registry (`base`), Hugging Face transformers (`hf/`) and vLLM (`vllm/`)."""
