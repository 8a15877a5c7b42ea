"""The rollout engine protocol, and the transformers ``generate`` engine (the reference path).

An engine samples ``n`` completions per prompt at the rollout's temperature/top-p and
returns, for each sampled token, the sampler's log-probability (the behaviour logprob).
It can replace its weights in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]      # behaviour logprob of each token, at the rollout temperature
    finish_reason: str         # "stop" (EOS or a stop string) or "length"


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], seed: int) -> list[list[Completion]]:
        """n completions for each prompt; deterministic for a fixed seed."""

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace the policy weights in place (Hugging Face names)."""

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """log p(token_t | tokens_<t) at temperature 1 for t >= 1 (used to verify a weight sync)."""


class HFEngine:
    """transformers ``generate`` with sampling: what TRL uses without vLLM."""

    def __init__(self, model_dir: str, rollout_cfg, dtype: str = "float32"):
        from transformers import GenerationConfig

        from policy.models import load_model, load_tokenizer
        torch.set_num_threads(rollout_cfg.threads)
        self.cfg = rollout_cfg
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_model(model_dir, dtype).eval()
        self.pad = self.tokenizer.pad_token_id
        self.stop = list(rollout_cfg.stop)
        # Every end-of-sequence id of the checkpoint's generation config (an instruct model's end of
        # turn beside the tokenizer's EOS), as vLLM stops on them.
        loaded = self.model.generation_config
        listed = loaded.eos_token_id if isinstance(loaded.eos_token_id, list) else [loaded.eos_token_id]
        self.eos_ids = [i for i in dict.fromkeys([self.tokenizer.eos_token_id, *listed]) if i is not None]
        # The run's sampling settings only: generate() fills what it is not given from the model's
        # generation config (a checkpoint's repetition_penalty, top_k, min_p, ...), which would sample
        # from another distribution than the softmax(z/T) logged as the behaviour logprobs and trained on.
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos_ids, pad_token_id=self.pad,
                                                        bos_token_id=loaded.bos_token_id)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], seed: int) -> list[list[Completion]]:
        n, T = self.cfg.n, self.cfg.temperature
        width = max(map(len, prompt_ids))
        ids = torch.full((len(prompt_ids), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):  # left padding for generation
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        torch.manual_seed(seed)
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=T, top_p=self.cfg.top_p, top_k=0,
            max_new_tokens=self.cfg.max_tokens, num_return_sequences=n, eos_token_id=self.eos_ids,
            pad_token_id=self.pad, output_logits=True, return_dict_in_generate=True,
            stop_strings=self.stop or None, tokenizer=self.tokenizer if self.stop else None)
        new = out.sequences[:, width:]                                   # [B*n, S]
        logits = torch.stack(out.logits, dim=1).float() / T              # [B*n, S, V]
        logp = torch.log_softmax(logits, -1).gather(-1, new[..., None]).squeeze(-1)
        results: list[list[Completion]] = []
        for b in range(len(prompt_ids)):
            group = []
            for j in range(b * n, (b + 1) * n):
                tokens = new[j].tolist()
                end = next((t + 1 for t, token in enumerate(tokens) if token in self.eos_ids), len(tokens))
                finish = "stop" if tokens[:end] and tokens[end - 1] in self.eos_ids else "length"
                stopped = self._stop_string_end(tokens[:end])
                if stopped is not None:  # generate pads a row that stopped on a string: the pads are not samples
                    end, finish = stopped, "stop"
                group.append(Completion(tokens[:end], logp[j, :end].tolist(), finish))
            results.append(group)
        return results

    def _stop_string_end(self, tokens: list[int]) -> int | None:
        """The length up to and including the token that completes the first stop string (as vLLM
        keeps it), or None."""
        if not self.stop or not any(stop in self.tokenizer.decode(tokens) for stop in self.stop):
            return None  # one decode for a completion without a stop string
        for i in range(1, len(tokens) + 1):
            text = self.tokenizer.decode(tokens[:i])
            if any(stop in text for stop in self.stop):
                return i
        return None

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict)

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        from policy.models import probe_logprobs
        return probe_logprobs(self.model, token_ids)
