"""The Hugging Face transformers backend: applying a plan to a model (`apply`), finding its MoE layers (`model`), loading checkpoints, routing statistics, perplexity."""
