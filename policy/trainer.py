"""PolicyTrainer: per-token logprobs, the GRPO loss, backward and an AdamW step.

A plain class (no Ray): the trainer actor in ``orchestration/`` is a thin shell around it.
Old logprobs are recomputed by the trainer (one optimizer step per rollout batch, so the
ratio is exactly 1 in value, as in verl's default); the sampler's behaviour logprobs are
compared against them every step and reported as ``logp_mismatch_max``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from policy.batch import Group, pad_sequences
from attention.layout import balance_groups
from policy.grpo import ADVANTAGES, StepTotals, grpo_loss
from policy.models import load_model, load_tokenizer
from policy.packed import packed_token_logprobs, upcast


def token_logprobs(model, batch, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of ``batch.targets`` at ``temperature``; [B, R], zero on padding.

    The LM head is applied to the whole row, then the predicting positions are gathered.
    """
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = out.logits  # [B, L, V]
    V = logits.shape[-1]
    picked = logits.gather(1, batch.predict_pos[..., None].expand(-1, -1, V))  # [B, R, V]
    logp = torch.log_softmax(upcast(picked) / temperature, dim=-1)
    logp = logp.gather(-1, batch.targets[..., None]).squeeze(-1)  # [B, R]
    return logp * batch.response_mask


class PolicyTrainer:
    def __init__(self, model_dir: str | Path, trainer_cfg, algorithm_cfg, temperature: float,
                 max_tokens: int, dtype: str = "float32"):
        self.cfg, self.algo = trainer_cfg, algorithm_cfg
        self.temperature, self.max_tokens = temperature, max_tokens
        torch.set_num_threads(trainer_cfg.threads)
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_model(model_dir, dtype).to(trainer_cfg.device)
        self.model.train()
        self.ref_model = None
        if algorithm_cfg.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=trainer_cfg.lr, weight_decay=trainer_cfg.weight_decay,
            betas=(trainer_cfg.beta1, trainer_cfg.beta2))
        self.version = 0

    # ---- training -------------------------------------------------------------------

    def step(self, groups: list[Group]) -> dict[str, float]:
        """Update the policy on complete, rewarded groups (``trainer.mini_batches`` optimizer
        steps, one policy version); returns metrics."""
        t0 = time.perf_counter()
        for g in groups:
            if g.rewards is None or len(g.rewards) != g.n:
                raise ValueError(f"group of prompt {g.index} has no rewards for its {g.n} responses")
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)  # [G, N]
        if not torch.isfinite(rewards).all():
            bad = [g.index for g in groups if not torch.isfinite(torch.tensor(g.rewards)).all()]
            raise ValueError(f"non-finite rewards in step {self.version} (prompt indices {bad}); "
                             f"check the reward functions")
        advantages = ADVANTAGES[self.algo.advantage](rewards).flatten().float()  # [G*N]
        prompts = [g.prompt_ids for g in groups for _ in range(g.n)]
        responses = [r for g in groups for r in g.responses]
        behaviour = [lp for g in groups for lp in g.behaviour_logprobs]
        versions = [g.version for g in groups for _ in range(g.n)]
        n = len(responses)
        # Old logprobs: the trainer's policy before this step's first update. With one
        # mini-batch they are the current logprobs, detached (free); with more, one extra
        # no-grad pass computes them up front.
        old: list[torch.Tensor] | None = None
        if self.cfg.mini_batches > 1:
            with torch.no_grad():
                old = [None] * n
                for idx in self._micro_batches(prompts, responses, range(n)):
                    lp, _ = self._logprobs(self.model, prompts, responses, idx)
                    for i, row in zip(idx, lp.cpu()):
                        old[i] = row[:len(responses[i])]
        size = -(-n // self.cfg.mini_batches)
        sums: dict[str, float] = {}
        mismatch, grad_norms = 0.0, []
        for start in range(0, n, size):
            mini = range(start, min(start + size, n))
            totals = StepTotals(tokens=max(sum(len(responses[i]) for i in mini), 1), sequences=len(mini),
                                max_tokens=self.max_tokens)
            self.optimizer.zero_grad(set_to_none=True)
            for idx in self._micro_batches(prompts, responses, mini):
                logp, mask = self._logprobs(self.model, prompts, responses, idx)
                old_logp = logp.detach() if old is None else _pad_rows([old[i] for i in idx], logp)
                ref_logp = None
                if self.ref_model is not None:
                    with torch.no_grad():
                        ref_logp, _ = self._logprobs(self.ref_model, prompts, responses, idx)
                is_weight = self._behaviour_weight(old_logp, [behaviour[i] for i in idx], [versions[i] for i in idx])
                loss, m = grpo_loss(logp, old_logp, advantages[idx].to(logp.device), mask,
                                    totals, self.algo.loss_agg, self.algo.clip_low, self.algo.clip_high,
                                    self.algo.kl_coef, ref_logp, is_weight)
                if not torch.isfinite(loss):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise FloatingPointError(
                        f"non-finite loss at policy version {self.version} (sequences {idx[0]}..{idx[-1]}); "
                        f"this mini-batch was not applied. Lower trainer.lr or check the model dtype.")
                loss.backward()
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v * len(idx)
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / self.cfg.mini_batches
                on_policy = torch.tensor([float(versions[i] == self.version) for i in idx])[:, None]
                mismatch = max(mismatch, _max_mismatch(old_logp.cpu(), [behaviour[i] for i in idx],
                                                       mask.cpu() * on_policy))
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                self.optimizer.zero_grad(set_to_none=True)
                raise FloatingPointError(f"non-finite gradient norm at policy version {self.version}; "
                                         f"this mini-batch was not applied")
            self.optimizer.step()
            grad_norms.append(float(grad_norm))
        staleness = [self.version - v for v in versions]  # policy versions behind, at training time
        self.version += 1
        seconds = time.perf_counter() - t0
        metrics = {k: (v if k == "loss" else v / n) for k, v in sums.items()}
        metrics.update(staleness_mean=sum(staleness) / n, staleness_max=float(max(staleness)))
        metrics.update(grad_norm=sum(grad_norms) / len(grad_norms), logp_mismatch_max=mismatch, update_s=seconds,
                       update_tokens=float(sum(len(p) + len(r) for p, r in zip(prompts, responses))),
                       version=float(self.version))
        metrics["update_tok_s"] = metrics["update_tokens"] / seconds
        return metrics

    def _micro_batches(self, prompts, responses, indices) -> list[list[int]]:
        """Sequence indices per forward/backward. Unpacked: chunks of micro_batch_size.
        Packed: whole same-prompt runs (groups), balanced by packed token count."""
        indices = list(indices)
        mb = self.cfg.micro_batch_size
        if not self.cfg.shared_prompt:
            return [indices[lo:lo + mb] for lo in range(0, len(indices), mb)]
        runs: list[list[int]] = []
        for i in indices:
            if runs and prompts[runs[-1][-1]] == prompts[i]:
                runs[-1].append(i)
            else:
                runs.append([i])
        lens = [len(prompts[r[0]]) + sum(len(responses[i]) for i in r) for r in runs]
        bins = balance_groups([len(r) for r in runs], lens, mb)
        return [[i for g in b for i in runs[g]] for b in bins]

    def _behaviour_weight(self, old_logp: torch.Tensor, behaviour: list[list[float]],
                          versions: list[int]) -> torch.Tensor | None:
        """Truncated importance weight min(π_prox/π_behav, C) for samples of an older policy
        version; exactly 1 for on-policy samples (None when all are on-policy)."""
        if all(v >= self.version for v in versions):
            return None
        behav = _pad_rows([torch.tensor(b, dtype=old_logp.dtype) for b in behaviour], old_logp)
        weight = torch.exp(old_logp - behav).clamp(max=self.algo.is_cap)
        stale = torch.tensor([v < self.version for v in versions], device=old_logp.device)[:, None]
        return torch.where(stale, weight, torch.ones_like(weight))

    def _logprobs(self, model, prompts, responses, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp [len(idx), R], response mask [len(idx), R]) of sequences ``idx``."""
        ps, rs = [prompts[i] for i in idx], [responses[i] for i in idx]
        if self.cfg.shared_prompt:
            return packed_token_logprobs(model, ps, rs, self.tokenizer.pad_token_id, self.temperature,
                                         self.cfg.attention_backend)
        batch = _to(pad_sequences(ps, rs, self.tokenizer.pad_token_id), self.cfg.device)
        return token_logprobs(model, batch, self.temperature), batch.response_mask

    @torch.no_grad()
    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        """log p(token_t | tokens_<t) at temperature 1 for t >= 1: the weight-sync probe."""
        logits = self.model(torch.tensor([token_ids], device=self.cfg.device)).logits[0, :-1].float()
        target = torch.tensor(token_ids[1:], device=self.cfg.device)[:, None]
        return torch.log_softmax(logits, -1).gather(-1, target)[:, 0].tolist()

    # ---- state ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Current policy weights in Hugging Face checkpoint names (detached CPU copies)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def save_checkpoint(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        torch.save({"optimizer": self.optimizer.state_dict(), "version": self.version},
                   directory / "trainer_state.pt")
        return directory

    def load_checkpoint(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.model.load_state_dict(load_model(directory).state_dict())
        state = torch.load(directory / "trainer_state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])


def _to(batch, device):
    if device == "cpu":
        return batch
    return type(batch)(*(getattr(batch, f).to(device) for f in batch.__dataclass_fields__))


def _pad_rows(rows: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Per-sequence 1-D tensors, zero-padded to ``like``'s [B, R]."""
    out = torch.zeros_like(like)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row.to(like.device, like.dtype)
    return out


def _max_mismatch(logp: torch.Tensor, behaviour: list[list[float]], mask: torch.Tensor) -> float:
    """max |trainer logp − behaviour logp| over real response tokens."""
    ref = torch.zeros_like(logp)
    for i, lps in enumerate(behaviour):
        ref[i, :len(lps)] = torch.tensor(lps, dtype=logp.dtype)
    return float(((logp - ref).abs() * mask).max()) if mask.any() else 0.0
