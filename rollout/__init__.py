"""Rollout: engines (vLLM, transformers), the vLLM adapter, the worker, rewards."""
