"""GRPO policy: models, tokenizer, logprobs, losses, trainer (no Ray, no vLLM)."""
