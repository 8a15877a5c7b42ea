"""Train a drafter head on the policy's own samples (self-distillation) before RL:

    python -m mtp.train --config configs/tiny.yaml [mtp.objective=ce mtp.steps=300 ...]

1. The policy samples ``rollout.n`` responses to ``mtp.prompts`` training prompts and
   ``mtp.heldout_prompts`` held-out prompts (the rollout engine, the rollout temperature).
2. A drafter is trained on the training sequences — an :class:`mtp.heads.EagleHead`
   (``mtp.head=eagle``; with ``mtp.draft_vocab=N`` an :class:`mtp.heads.Eagle3Head` drafting
   from the N tokens sampled most, with ``mtp.parallel=true`` a P-EAGLE one for vLLM's parallel
   drafting) or the checkpoint's native MTP layer (``mtp.head=native``, vLLM's ``mtp`` method:
   :class:`mtp.native.MiMoMTPHead` for a Qwen2/MiMo policy, :class:`mtp.native.DeepSeekMTPHead`
   for a DeepSeek-V3 one with a dense MTP block; starts from the checkpoint's layer if it has one): ``mtp.k`` draft steps
   unrolled as the engine runs them, targets p = the policy's distributions at the rollout
   temperature (``mtp.objective``: "tv" = KL warm start then the multi-step acceptance
   objective; "ce" = cross-entropy on the sampled tokens).
3. Report: per-position acceptance predicted offline on the held-out sequences (from
   Σ min(p, q) along the unrolled chain) next to the acceptance vLLM measures when it drafts
   with the exported head on the held-out prompts. Agreement shows the exported head is the
   trained one. Written to ``<out>/report.json`` with the vLLM draft checkpoint in ``<out>``
   (``mtp.head=native``: ``<out>`` is the policy checkpoint with the trained MTP layer; train on
   it with ``model.path=<out> rollout.spec_method=mtp``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mtp import losses
from mtp.batch import draft_targets, loss_fn, predicted_acceptance
from mtp.heads import Eagle3Head, EagleHead
from mtp.native import has_native_mtp, native_form
from mtp.optim import HeadOptimizer
from orchestration.config import Config, ConfigError, load_config
from orchestration.data import DataError, load_prompts
from orchestration.model_prep import prepare_model
from policy.models import encode_prompt, load_model, load_tokenizer, save_model, set_cpu_math

log = logging.getLogger("rlaccel.mtp")


def sample_sequences(model_dir: Path, config: Config, prompts: list[list[int]],
                     seed: int) -> list[list[tuple[list[int], int]]]:
    """Per prompt: (prompt + response token ids, prompt length) of its rollout.n samples."""
    from rollout.worker import make_engine
    engine = make_engine(str(model_dir), dataclasses.replace(config.rollout, draft_model=None, spec_method="eagle"),
                         config.model.dtype, seed)
    try:
        outs = engine.generate(prompts, seed)
    finally:
        del engine
        gc.collect()
    return [[(p + c.token_ids, len(p)) for c in group if c.token_ids] for p, group in zip(prompts, outs)]


def measured_acceptance(model_dir: Path, draft_dir: Path, config: Config, prompts: list[list[int]], seed: int) -> dict:
    """Acceptance vLLM measures drafting with the exported head (k = mtp.k every round, whatever
    rollout.spec_schedule says) on ``prompts``;
    ``mtp.head=native``: ``draft_dir`` is the checkpoint with the trained MTP layer."""
    from rollout.vllm_spec import spec_decode_delta, spec_decode_rates
    from rollout.vllm_engine import VLLMEngine
    if config.mtp.head == "native":
        model_dir, rollout = draft_dir, dataclasses.replace(config.rollout, draft_model=None, spec_method="mtp",
                                                            num_speculative_tokens=config.mtp.k, adaptive_spec=False, spec_schedule=None)
    else:
        rollout = dataclasses.replace(config.rollout, draft_model=str(draft_dir), spec_method="eagle",
                                      num_speculative_tokens=config.mtp.k, adaptive_spec=False, spec_schedule=None)
    engine = VLLMEngine(str(model_dir), rollout, config.model.dtype, seed)
    try:
        before = engine.spec_counters()
        t0 = time.perf_counter()
        outs = engine.generate(prompts, seed)
        seconds = time.perf_counter() - t0
        rates = spec_decode_rates(spec_decode_delta(before, engine.spec_counters()))
    finally:
        del engine
        gc.collect()
    rates["tokens_per_s"] = sum(len(c.token_ids) for g in outs for c in g) / seconds
    return rates


def most_sampled(seqs: list[tuple[list[int], int]], n: int, vocab_size: int) -> torch.Tensor:
    """The ``n`` token ids the policy sampled most in ``seqs``' responses (ties to the lower id),
    sorted: the draft vocabulary of an EAGLE-3 head."""
    sampled = torch.tensor([t for s, prompt_len in seqs for t in s[prompt_len:]], dtype=torch.long)
    counts = torch.bincount(sampled, minlength=vocab_size)
    order = torch.sort(-counts, stable=True).indices  # stable: equal counts keep id order
    return order[:n].sort().values


def train(config: Config, progress: bool = True) -> dict:
    """Train, export and report; returns the report (also ``<out>/report.json``)."""
    m, seed = config.mtp, config.orchestration.seed
    set_cpu_math(m.threads, config.trainer.flush_denormal)
    out = Path(m.out or Path(config.logging.dir) / "drafter")
    model_dir = prepare_model(config, progress=progress)
    form = None
    if m.head == "native":  # before sampling: a policy no native form fits fails at once
        policy_config = json.loads((Path(model_dir) / "config.json").read_text())
        try:
            form = native_form(policy_config.get("model_type"))
            form.check_policy(policy_config)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    tokenizer = load_tokenizer(model_dir)
    rows = load_prompts(config.data, tokenizer)
    if len(rows) < m.prompts + m.heldout_prompts:
        raise ConfigError(f"mtp.prompts + mtp.heldout_prompts = {m.prompts + m.heldout_prompts} exceeds the "
                          f"{len(rows)} prompts of data.source; lower them")
    order = random.Random(seed).sample(range(len(rows)), m.prompts + m.heldout_prompts)
    ids = [encode_prompt(tokenizer, rows[i]["prompt"]) for i in order]  # as the rollout workers encode them
    train_ids, heldout_ids = ids[:m.prompts], ids[m.prompts:]
    t0 = time.perf_counter()
    per_prompt = sample_sequences(model_dir, config, train_ids + heldout_ids, seed)
    train_seqs = [s for group in per_prompt[:len(train_ids)] for s in group]
    heldout_seqs = [s for group in per_prompt[len(train_ids):] for s in group]
    log.info("sampled %d sequences in %.1fs", len(train_seqs) + len(heldout_seqs), time.perf_counter() - t0)

    policy = load_model(model_dir, config.model.dtype).eval().requires_grad_(False)
    if form is not None:
        head = form.load_vllm(model_dir) if has_native_mtp(model_dir) else form.for_policy(policy, m.layers)
    elif m.draft_vocab:
        if m.draft_vocab >= policy.config.vocab_size:
            raise ConfigError(f"mtp.draft_vocab={m.draft_vocab}: must be below the policy's vocabulary "
                              f"({policy.config.vocab_size}); 0 drafts over the whole vocabulary")
        # A parallel head's mask token: the pad token (or EOS): only an input at mask slots, its
        # embedding the policy's.
        mask = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        head = Eagle3Head.for_policy(policy, most_sampled(train_seqs, m.draft_vocab, policy.config.vocab_size),
                                     parallel=m.parallel, mask_token_id=mask)
    else:
        head = EagleHead.for_policy(policy, m.layers)
    optimizer = HeadOptimizer(head, m.lr)  # float32 master weights for a bfloat16 head
    # Cosine decay to 10% of mtp.lr: the last steps refine the acceptance the constant rate oscillates around.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer.optimizer, lambda i: 0.1 + 0.45 * (1 + math.cos(math.pi * min(i, m.steps) / max(1, m.steps))))
    rng = random.Random(seed + 1)
    T = config.rollout.temperature
    history = []
    bar = tqdm(range(m.steps), desc=f"mtp ({m.objective})", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = rng.sample(train_seqs, min(m.batch, len(train_seqs)))
        steps = draft_targets(policy, head, batch, m.k, tokenizer.pad_token_id)
        loss = loss_fn(steps, m.objective, step < m.warm_steps, T, m.kl_weight)
        optimizer.zero_grad()
        loss.backward()
        if not torch.isfinite(loss) or not math.isfinite(optimizer.step(1.0)):  # not applied: no NaN head is saved
            raise FloatingPointError(f"mtp.train: non-finite {'loss' if not torch.isfinite(loss) else 'gradient norm'} "
                                     f"at step {step} of {m.steps}; lower mtp.lr (now {m.lr}), or train in float32 "
                                     f"(model.dtype)")
        schedule.step()
        with torch.no_grad():
            alpha1 = losses.masked_mean(losses.acceptance(steps[0][0], steps[0][1], T), steps[0][3])
        history.append({"step": step, "loss": float(loss.detach()), "alpha1": float(alpha1)})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", alpha1=f"{float(alpha1):.3f}")
    head.eval()
    predicted = predicted_acceptance(policy, head, heldout_seqs, m.k, T, tokenizer.pad_token_id)
    if m.head == "native":  # the policy checkpoint with the trained layer
        save_model(policy, tokenizer, out)
    head.save_vllm(out)
    measured = measured_acceptance(model_dir, out, config, heldout_ids, seed + 2)
    report = {"objective": m.objective, "k": m.k, "temperature": T, "train_sequences": len(train_seqs),
              "heldout_sequences": len(heldout_seqs), "predicted": predicted, "vllm": measured,
              "history": history}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m mtp.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. mtp.objective=ce")
    args = parser.parse_args(argv)
    try:
        report = train(load_config(args.config, args.overrides))
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pred, got = report["predicted"]["acceptance_per_pos"], report["vllm"].get("acceptance_per_pos", [])
    print("acceptance per position, predicted offline:", " ".join(f"{a:.3f}" for a in pred))
    print("acceptance per position, measured in vLLM: ", " ".join("n/a" if a is None else f"{a:.3f}" for a in got))
    print(f"mean accepted length: predicted {report['predicted']['mean_accepted_len']:.2f}, "
          f"vLLM {report['vllm'].get('mean_accepted_len', float('nan')):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
