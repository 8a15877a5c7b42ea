"""PolicyTrainer: per-token logprobs, the GRPO loss, backward and an AdamW step.

A plain class (no Ray): the trainer actor in ``orchestration/`` is a thin shell around it.
Old logprobs are recomputed by the trainer (one optimizer step per rollout batch, so the
ratio is exactly 1 in value, as in verl's default); the sampler's behaviour logprobs are
compared against them every step and reported as ``logp_mismatch_max``.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path

import torch

from attention.hf import shared_prompt_attention_enabled
from attention.layout import balance_groups
from policy.batch import Group, pad_sequences
from policy.compiled import compile_layers
from policy.distributed import DeepSpeedUpdate, LocalUpdate, UpdateNotApplied
from policy.grpo import ADVANTAGES, StepTotals, behaviour_weight, grpo_loss, weighs_on_policy
from policy.models import flatten_parameters, load_model, load_tokenizer, set_cpu_math
from policy.packed import PLAIN_LM_HEAD, head_logprobs, packed_token_logprobs, tempered


def token_logprobs(model, batch, temperature: float = 1.0, logit_chunk: int = 0) -> torch.Tensor:
    """Log-probabilities of ``batch.targets`` at ``temperature``; [B, R], zero on padding.

    For the families in ``PLAIN_LM_HEAD`` the LM head is applied only at the predicting positions
    (as TRL's ``logits_to_keep`` and the packed path do): on a 32k vocabulary it is a quarter of
    a ~100M model, and the prompt positions' logits are never used; ``logit_chunk`` > 0 applies it
    in chunks (:func:`policy.packed.head_logprobs`).
    """
    if model.config.model_type in PLAIN_LM_HEAD:
        hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             use_cache=False).last_hidden_state                  # [B, L, d]
        picked = hidden.gather(1, batch.predict_pos[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, R, d]
        B, R, d = picked.shape
        logp = head_logprobs(model, picked.reshape(B * R, d), torch.arange(B * R, device=picked.device),
                             batch.targets.reshape(B * R), temperature, logit_chunk).reshape(B, R)
        return logp * batch.response_mask
    # the model's own forward (it may scale or soft-cap its logits), then gather
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    logits = logits.gather(1, batch.predict_pos[..., None].expand(-1, -1, logits.shape[-1]))
    logp = torch.log_softmax(tempered(logits, temperature), dim=-1)
    logp = logp.gather(-1, batch.targets[..., None]).squeeze(-1)  # [B, R]
    return logp * batch.response_mask


def sparse_tied_embedding(model) -> bool:
    """Let a tied input embedding's backward return its gradient as the rows of the batch's
    tokens (``nn.Embedding(sparse=True)``); returns whether it does.

    The matrix is also the LM head's weight, whose gradient is dense: autograd adds the two
    before the weight's ``.grad`` (in one process the head's gradient becomes ``.grad`` first and
    the rows are added to it in place: :func:`policy.packed.lm_head`), which therefore stays dense
    (clipping, AdamW and ZeRO see no difference). The dense embedding backward zero-fills and then
    adds a whole [V, d] matrix per micro-batch (24.6M floats on the 100M preset: its one-thread
    small-short step took 0.996 s against 0.976 s sparse, ``benchmarks/packed_head.py``); the
    sparse one adds only the rows used. Same sum, up to the order in which a repeated token's rows
    are added. An untied embedding keeps the dense gradient (a sparse ``.grad`` would reach the
    optimizer)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = isinstance(embed, torch.nn.Embedding) and head is not None and embed.weight is head.weight
    if tied:
        embed.sparse = True
    return tied


def mini_batch_ids(num_groups: int, mini_batches: int) -> list[int]:
    """The mini-batch of each group of a step: the groups in order, in ``mini_batches`` runs."""
    return [g * mini_batches // num_groups for g in range(num_groups)]


class PolicyTrainer:
    def __init__(self, model_dir: str | Path, trainer_cfg, algorithm_cfg, temperature: float,
                 max_tokens: int, dtype: str = "float32"):
        self.cfg, self.algo = trainer_cfg, algorithm_cfg
        self.temperature, self.max_tokens = temperature, max_tokens
        set_cpu_math(trainer_cfg.threads, trainer_cfg.flush_denormal)
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_model(model_dir, dtype).to(trainer_cfg.device)
        self.model.train()
        if trainer_cfg.shared_prompt and self.model.config.model_type not in PLAIN_LM_HEAD:
            raise ValueError(f"trainer.shared_prompt: the packed path applies the LM head to the hidden states itself, "
                             f"which is exact only for {sorted(PLAIN_LM_HEAD)}; {model_dir} is a "
                             f"{self.model.config.model_type!r} (its forward may scale or soft-cap the logits): "
                             "set trainer.shared_prompt=false")
        # one process, a tied head: its weight gradient goes straight into .grad (policy.packed.lm_head)
        self.model.rlaccel_head_grad_into_param = sparse_tied_embedding(self.model) and trainer_cfg.world_size == 1
        if trainer_cfg.world_size == 1 and str(trainer_cfg.device) == "cpu":
            flatten_parameters(self.model)  # the weight sync's export then puts one array (policy.models.pack_state)
        if trainer_cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # algorithm.behaviour_weight: on-policy samples are weighted too ("all"; "auto" in half precision)
        self.weigh_on_policy = weighs_on_policy(algorithm_cfg.behaviour_weight, self.model.dtype)
        self.ref_model = None
        if algorithm_cfg.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.compiled_layers = compile_layers(self.model, trainer_cfg.compile, trainer_cfg.device,
                                              trainer_cfg.world_size, trainer_cfg.gradient_checkpointing, self._warm_up)
        # One process, or this rank of a data-parallel group (torch.distributed already set up).
        self.update = (LocalUpdate if trainer_cfg.world_size == 1 else DeepSpeedUpdate)(self.model, trainer_cfg)
        self.version = 0

    # ---- training -------------------------------------------------------------------

    def step(self, groups: list[Group], mini_batch: list[int] | None = None) -> dict[str, float]:
        """Update the policy on complete, rewarded groups (``trainer.mini_batches`` optimizer
        steps, one policy version); returns metrics. ``mini_batch[g]`` is the mini-batch of
        group g: by default the groups in order, split into ``trainer.mini_batches`` runs; a
        data-parallel rank gets its share of each from the driver."""
        # A checkpointed layer recomputes its forward in the backward, after packed_token_logprobs
        # has put the model's own attention back: the shared-prompt one stays on for the whole step.
        packed_backward = self.cfg.shared_prompt and self.cfg.gradient_checkpointing
        with shared_prompt_attention_enabled(self.model) if packed_backward else contextlib.nullcontext():
            return self._step(groups, mini_batch)

    def _step(self, groups: list[Group], mini_batch: list[int] | None) -> dict[str, float]:
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
        M = self.cfg.mini_batches
        if mini_batch is None:
            mini_batch = mini_batch_ids(len(groups), M)
        seq_mini = [m for g, m in zip(groups, mini_batch) for _ in range(g.n)]
        minis = [[i for i in range(n) if seq_mini[i] == m] for m in range(M)]
        work = [self._to_compute(mini, advantages, responses) for mini in minis]
        # Old logprobs: the trainer's policy before this step's first update. With one
        # mini-batch they are the current logprobs, detached (free); with more, one extra
        # no-grad pass computes them up front.
        old: list[torch.Tensor] | None = None
        if self.cfg.mini_batches > 1:
            with torch.no_grad():
                old = [None] * n
                for idx in self._micro_batches(prompts, responses, [i for w in work for i in w]):
                    lp, _ = self._logprobs(self.model, prompts, responses, idx)
                    for i, row in zip(idx, lp.cpu()):
                        old[i] = row[:len(responses[i])]
        sums: dict[str, float] = {}  # the loss's metrics (token means of a micro-batch) summed over tokens
        mismatch, grad_norms, token_count = 0.0, [], 0.0
        for m, mini in enumerate(minis):  # always M mini-batches (maybe empty on a rank): the group steps together
            # the loss's denominators count every response, computed or skipped
            tokens, sequences = self.update.all_sum([sum(len(responses[i]) for i in mini), len(mini)])
            if sequences == 0:  # fewer groups than mini-batches: nothing to step on (on any rank)
                continue
            totals = StepTotals(tokens=max(int(tokens), 1), sequences=int(sequences),
                                max_tokens=self.max_tokens)
            self.update.zero_grad()
            micro = self._micro_batches(prompts, responses, work[m])
            # Every rank of a group runs the same number of backwards (ZeRO-2 reduces in each).
            backwards_due = int(self.update.all_max([len(micro)])[0])
            finite, backwards = True, 0
            for idx in micro:
                logp, mask = self._logprobs(self.model, prompts, responses, idx)
                old_logp = logp.detach() if old is None else _pad_rows([old[i] for i in idx], logp)
                ref_logp = None
                if self.ref_model is not None:
                    with torch.no_grad():
                        ref_logp, _ = self._logprobs(self.ref_model, prompts, responses, idx)
                is_weight = self._behaviour_weight(old_logp, [behaviour[i] for i in idx], [versions[i] for i in idx])
                loss, mb = grpo_loss(logp, old_logp, advantages[idx].to(logp.device), mask,
                                     totals, self.algo.loss_agg, self.algo.clip_low, self.algo.clip_high,
                                     self.algo.kl_coef, ref_logp, is_weight)
                finite = finite and bool(torch.isfinite(loss))
                if finite:  # after a non-finite loss nothing more is accumulated; the step is refused below
                    self.update.backward(loss)
                    backwards += 1
                tokens_here = sum(len(responses[i]) for i in idx)  # the mask's count, without a device sync
                token_count += tokens_here
                for k, v in mb.items():
                    sums[k] = sums.get(k, 0.0) + v * tokens_here
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / M
                on_policy = torch.tensor([float(versions[i] == self.version) for i in idx])[:, None]
                mismatch = max(mismatch, _max_mismatch(old_logp.cpu(), [behaviour[i] for i in idx],
                                                       mask.cpu() * on_policy))
            self.update.pad_backwards(backwards_due - backwards)
            if self.update.all_max([0.0 if finite else 1.0])[0] > 0:  # every rank of a group raises
                self.update.zero_grad()
                raise _refusal(grad_norms)(
                    f"non-finite loss at policy version {self.version} (mini-batch {m + 1} of {M}{_applied(grad_norms)}); "
                    f"it was not applied. Lower trainer.lr or check the model dtype; if a resume fails the same "
                    f"way at once, the policy itself has diverged: resume from an earlier checkpoint.")
            try:
                grad_norms.append(self.update.step())
            except UpdateNotApplied as exc:
                raise _refusal(grad_norms)(f"{exc} (policy version {self.version}, mini-batch {m + 1} of {M}"
                                 f"{_applied(grad_norms)})") from None
            except FloatingPointError as exc:
                raise FloatingPointError(f"{exc} (policy version {self.version})") from None
        keys = sorted(sums)
        sums = dict(zip(keys, self.update.all_sum([sums[k] for k in keys])))
        mismatch = self.update.all_max([mismatch])[0]
        n, computed, token_count = (max(int(x), 1) for x in self.update.all_sum(
            [n, sum(len(w) for w in work), token_count]))
        staleness = [self.version - v for v in versions]  # policy versions behind, at training time
        stale_sum, update_tokens = self.update.all_sum(
            [sum(staleness), sum(len(p) + len(r) for p, r in zip(prompts, responses))])
        stale_max = self.update.all_max([max(staleness, default=0)])[0]
        self.version += 1
        seconds = self.update.all_max([time.perf_counter() - t0])[0]
        metrics = {k: (v if k == "loss" else v / token_count) for k, v in sums.items()}  # token means over the step
        metrics.update(staleness_mean=stale_sum / n, staleness_max=stale_max, update_skipped=1.0 - computed / n)
        metrics.update(grad_norm=sum(grad_norms) / max(len(grad_norms), 1), logp_mismatch_max=mismatch, update_s=seconds,
                       update_tokens=update_tokens, version=float(self.version))
        metrics["update_tok_s"] = metrics["update_tokens"] / seconds
        return metrics

    def _warm_up(self) -> None:
        """A forward and backward of two dummy groups (two responses each, every size > 1: a size
        of 1 would be compiled as a constant) through the steps' path, packed or not; their
        gradients are dropped. Compiled layers (``trainer.compile``) compile here."""
        prompts = [[1, 2, 3]] * 2 + [[4, 5]] * 2
        responses = [[6, 7], [8, 9, 10], [6, 7, 8], [9, 10]]
        try:
            logp, mask = self._logprobs(self.model, prompts, responses, list(range(len(responses))))
            (logp * mask).sum().backward()
        finally:
            self.model.zero_grad(set_to_none=True)

    def _to_compute(self, mini: list[int], advantages: torch.Tensor, responses) -> list[int]:
        """The responses of a mini-batch whose forward and backward are run. With
        ``trainer.skip_zero_advantage`` and no KL term, a response whose advantage is exactly 0
        (every response of a group of equal rewards: policy.grpo gives them exact zeros) adds
        exactly 0 to the loss and to every gradient while its loss is finite (its surrogate is
        ρ·0 and the loss's denominators are the step's totals), so it is left out: the update is
        the same up to float rounding (micro-batches composed differently). Its logprobs are then
        not compared with the sampler's either (``logp_mismatch_max`` covers the computed ones).
        The shortest response is kept when all would be skipped, so a mini-batch still has a
        backward: gradients of zeros rather than none (AdamW still counts the step and decays
        the weights; ZeRO ranks reduce together)."""
        if not mini or not self.cfg.skip_zero_advantage or self.ref_model is not None:
            return mini
        nonzero = (advantages != 0).tolist()
        return [i for i in mini if nonzero[i]] or [min(mini, key=lambda i: len(responses[i]))]

    def _micro_batches(self, prompts, responses, indices) -> list[list[int]]:
        """Sequence indices per forward/backward. Unpacked: chunks of micro_batch_size.
        Packed: whole same-prompt runs (groups), balanced by packed token count, within the
        activation memory of micro_batch_size unpacked rows of the longest sequence (length S),
        counted as the packed path pads (attention/layout.py): per layer, its rows × the longest
        row tokens of ~(hidden + intermediate) floats each and, per head, rows × (N·R·(P + R) + P²)
        attention scores (N, R, P: the micro-batch's most responses, longest response and longest
        prompt, to which the regions backend pads every row), against micro_batch_size × (S
        tokens, S² scores). Each prompt is counted once, so a micro-batch holds more sequences,
        and one very long response cannot pad many rows to its length (its scores count)."""
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
        longest = max((len(prompts[i]) + len(responses[i]) for i in indices), default=1)
        shape = [(len(prompts[r[0]]), len(r), max(len(responses[i]) for i in r)) for r in runs]  # P, N, R
        c = self.model.config
        per_token = c.hidden_size + (getattr(c, "intermediate_size", None) or 4 * c.hidden_size)
        per_score = c.num_attention_heads

        def fits(groups: list[int]) -> bool:
            P, N, R = (max(shape[g][d] for g in groups) for d in range(3))
            rows, row = len(groups), max(lens[g] for g in groups)
            padded = rows * (row * per_token + (N * R * (P + R) + P * P) * per_score)
            return padded <= mb * (longest * per_token + longest * longest * per_score)
        bins = balance_groups(lens, mb * longest, fits)
        return [[i for g in b for i in runs[g]] for b in bins]

    def _behaviour_weight(self, old_logp: torch.Tensor, behaviour: list[list[float]],
                          versions: list[int]) -> torch.Tensor | None:
        """Truncated importance weight min(π_prox/π_behav, C) for samples of an older policy
        version, and with ``weigh_on_policy`` for on-policy ones too (their π_prox is the sampler's
        policy computed by the trainer: the weight corrects the two computations' mismatch);
        exactly 1 for the others (None when no sample is weighted)."""
        rows = [self.weigh_on_policy or v < self.version for v in versions]
        if not any(rows):
            return None
        behav = _pad_rows([torch.tensor(b, dtype=old_logp.dtype) for b in behaviour], old_logp)
        return behaviour_weight(old_logp, behav, torch.tensor(rows, device=old_logp.device), self.algo.is_cap)

    def _logprobs(self, model, prompts, responses, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp [len(idx), R], response mask [len(idx), R]) of sequences ``idx``."""
        ps, rs = [prompts[i] for i in idx], [responses[i] for i in idx]
        if self.cfg.shared_prompt:
            return packed_token_logprobs(model, ps, rs, self.tokenizer.pad_token_id, self.temperature,
                                         self.cfg.attention_backend, self.cfg.logit_chunk)
        batch = _to(pad_sequences(ps, rs, self.tokenizer.pad_token_id), self.cfg.device)
        return token_logprobs(model, batch, self.temperature, self.cfg.logit_chunk), batch.response_mask

    # ---- state ----------------------------------------------------------------------

    def state_dict(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """Current policy weights in Hugging Face checkpoint names, detached, on the CPU: copies,
        or with ``copy=False`` the live CPU parameters themselves (for a reader that copies them
        before the next update, as Ray does with an actor method's return value)."""
        return {k: v.detach().to("cpu", copy=copy) for k, v in self.model.state_dict().items()}

    def save_checkpoint(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.update.rank == 0:  # every rank holds the same weights
            self.model.save_pretrained(directory, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
            torch.save({"version": self.version}, directory / "trainer_state.pt")
        self.update.save(directory)  # a group: every rank its optimizer partition
        return directory

    def load_checkpoint(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.model.load_state_dict(load_model(directory, self.model.dtype).state_dict())  # in its own dtype: exact
        self.update.load(directory)
        self.version = int(torch.load(directory / "trainer_state.pt", weights_only=True)["version"])


def _refusal(grad_norms: list) -> type[FloatingPointError]:
    """A refused mini-batch after applied ones leaves the step half done (weights changed, the
    version not); only a refusal before any is :class:`UpdateNotApplied` (the batch can be trained again)."""
    return FloatingPointError if grad_norms else UpdateNotApplied


def _applied(grad_norms: list) -> str:
    return f"; the {len(grad_norms)} before it were applied" if grad_norms else ""


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
    ref = _pad_rows([torch.tensor(lps, dtype=logp.dtype) for lps in behaviour], logp)
    return float(((logp - ref).abs() * mask).max()) if mask.any() else 0.0
