"""The packed trainer step's tied vocabulary matrix, side by side: the LM head as one multiply over
every group's positions against one per group (as before 39d38ba), and the tied embedding's
gradient as sparse rows added into the head's (``policy.trainer.sparse_tied_embedding``) against
the dense embedding backward.

On the 100M preset (32k vocabulary, tied head), one ``PolicyTrainer.step`` (forward, backward,
AdamW; shared-prompt training, every response computed) on the small-short cell's shapes: 4
arithmetic prompts × 8 responses of 2-5 tokens (the last EOS), new ones each step from one seed.
The variants take turns (one_head A, per_group_head B, dense_embedding_grad C: A B C A B C ...) on
one trainer (its weights move with every step, the same for all), the first step of each dropped
as warm-up. Before timing, each variant's logprobs and gradients on one batch are compared with
one_head's (float32; they differ by summation order only). The process runs with a run's trainer
allocator settings (``orchestration.keep_freed_memory``).

    python benchmarks/packed_head.py [--threads 1] [--rounds 15]

Writes benchmarks/results/packed_head.json ({machine, threads, max_logp_diff, max_grad_rel_diff
(each against one_head), rows: [{variant, step_s (median), steps: [...]}]}) and a PNG.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from common import (RESULTS, ROOT, alternating, machine, plot_medians, with_run_allocator,  # noqa: E402
                    write_results)

sys.path.insert(0, str(ROOT))


def per_group_head_logprobs(model, prompts, responses, pad_id, temperature=1.0, backend="regions"):
    """``policy.packed.packed_token_logprobs`` before 39d38ba: the LM head applied row by row."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    from attention.hf import shared_prompt_attention_enabled
    from attention.layout import pack, predicting_positions
    from policy.packed import tempered
    batch = pack(prompts, responses, pad_id)
    device = next(model.parameters()).device
    with shared_prompt_attention_enabled(model):
        hidden = model.model(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                             shared_prompt_batch=batch, shared_prompt_backend=backend,
                             use_cache=False).last_hidden_state
    per_row = []
    for b, row in enumerate(batch.rows):
        valid = row.response_valid.to(device)
        where = predicting_positions(row).to(device)[valid]
        unique, inverse = torch.unique(where, return_inverse=True)
        logprobs = torch.log_softmax(tempered(model.lm_head(hidden[b, unique]), temperature), dim=-1)
        targets = batch.input_ids[b].to(device)[row.response_index.to(device)[valid]]
        per_row.append(logprobs[inverse, targets].split(row.response_lens))
    per_seq = [per_row[b][n] for b, n in zip(batch.seq_row, batch.seq_response)]
    logp = pad_sequence(per_seq, batch_first=True)
    mask = pad_sequence([torch.ones(len(r), dtype=logp.dtype, device=device) for r in responses], batch_first=True)
    return logp, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="trainer threads (1: an async run's trainer)")
    parser.add_argument("--rounds", type=int, default=15, help="steps per variant (the first dropped)")
    parser.add_argument("--out", default=str(RESULTS / "packed_head.json"))
    args = parser.parse_args()
    with_run_allocator()

    import torch

    import policy.trainer as trainer_module
    from orchestration.config import load_config
    from orchestration.data import load_prompts
    from orchestration.model_prep import prepare_model
    from policy.batch import Group
    from policy.packed import packed_token_logprobs
    from policy.trainer import PolicyTrainer
    config = load_config("configs/small.yaml", [f"trainer.threads={args.threads}", "trainer.shared_prompt=true",
                                                "trainer.skip_zero_advantage=false", "algorithm.prompts_per_step=4"])
    model_dir = prepare_model(config)
    trainer = PolicyTrainer(model_dir, config.trainer, config.algorithm, 1.0, config.rollout.max_tokens)
    tokenizer = trainer.tokenizer
    rows = load_prompts(config.data, tokenizer)
    digits = tokenizer("0123456789", add_special_tokens=False).input_ids
    rng = random.Random(0)

    def groups() -> list[Group]:
        out = []
        for g, row in enumerate(rng.sample(rows, 4)):
            responses = [[rng.choice(digits) for _ in range(rng.randint(1, 4))] + [tokenizer.eos_token_id]
                         for _ in range(8)]
            out.append(Group(prompt=row["prompt"], prompt_ids=tokenizer(row["prompt"], add_special_tokens=False).input_ids,
                             responses=responses, behaviour_logprobs=[[-1.0] * len(r) for r in responses],
                             version=trainer.version, rewards=[float(rng.random() < 0.3) for _ in range(8)], index=g))
        return out

    embed = trainer.model.get_input_embeddings()
    assert embed.sparse, "the 100M preset's embedding is tied: the trainer makes its gradient sparse"
    # variant: (the packed logprobs, a sparse embedding gradient)
    variants = {"one_head": (packed_token_logprobs, True), "per_group_head": (per_group_head_logprobs, True),
                "dense_embedding_grad": (packed_token_logprobs, False)}
    # Same values: logprobs and the gradients of their sum, on one batch.
    batch = groups()
    prompts = [g.prompt_ids for g in batch for _ in range(g.n)]
    responses = [r for g in batch for r in g.responses]
    got = {}
    for name, (fn, sparse) in variants.items():
        trainer.model.zero_grad()
        embed.sparse = sparse
        logp, mask = fn(trainer.model, prompts, responses, tokenizer.pad_token_id)
        (logp * mask).sum().backward()
        got[name] = (logp.detach(), {k: p.grad.clone() for k, p in trainer.model.named_parameters()})
    trainer.model.zero_grad()
    a, ga = got["one_head"]
    max_logp_diff, max_grad_rel = {}, {}
    for name, (b, gb) in got.items():
        if name != "one_head":
            max_logp_diff[name] = (a - b).abs().max().item()
            max_grad_rel[name] = max(((ga[k] - gb[k]).norm() / ga[k].norm().clamp_min(1e-30)).item() for k in ga)
            print(f"one_head vs {name}: logprobs differ by {max_logp_diff[name]:.2e}, gradients by "
                  f"{max_grad_rel[name]:.2e} (relative)")

    times = {v: [] for v in variants}
    try:
        for v in alternating(list(variants), args.rounds):
            trainer_module.packed_token_logprobs, embed.sparse = variants[v]
            step_groups = groups()
            t0 = time.perf_counter()
            trainer.step(step_groups)
            times[v].append(time.perf_counter() - t0)
            print(f"{v:15s} {times[v][-1]:.3f} s", flush=True)
    finally:
        trainer_module.packed_token_logprobs, embed.sparse = packed_token_logprobs, True
    result = {"machine": machine(), "threads": args.threads, "max_logp_diff": max_logp_diff,
              "max_grad_rel_diff": max_grad_rel,
              "rows": [{"variant": v, "step_s": statistics.median(t[1:]), "steps": t} for v, t in times.items()]}
    for r in result["rows"]:
        print(f"{r['variant']:15s} median {r['step_s']:.3f} s")
    write_results(result, args.out, plot)


def plot(result: dict, path) -> None:
    rows = result["rows"]
    plot_medians(path, [r["variant"] for r in rows], [r["steps"] for r in rows],
                 f"trainer step, s (median; dots: each step after the first), {result['threads']} thread(s)",
                 "100M preset, small-short shapes: the packed step's tied vocabulary matrix", ["C0", "C1", "C2"])


if __name__ == "__main__":
    main()
