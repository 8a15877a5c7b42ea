"""Orchestration: config, data, the GRPO entry point, metrics."""
