"""vLLM backend: apply Alloc-MoE plans inside vLLM engine workers (see plugin.py)."""
