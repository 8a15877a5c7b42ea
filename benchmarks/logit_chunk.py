"""The update's LM head in chunks (``trainer.logit_chunk``) against all at once: peak memory and time.

A GRPO trainer step's [tokens, vocabulary] float32 logits, their log-softmax and its gradient are
alive together; with a real model's vocabulary (Qwen3: 151,936) they outweigh everything else a
small model's step holds. Here: a Qwen3-architecture model with that vocabulary and a small body
(hidden 256, 2 layers, tied head: 39M parameters, most of them the vocabulary matrix), float32,
shared-prompt training, one step = 2 prompts × 8 responses of 128 tokens (2,048 response tokens:
1.2 GB per copy of their logits), 2 threads. Each variant runs in its own process (peak resident
memory is per process): a step to warm up, then ``--steps`` timed steps on the same batch; the
peak RSS minus the RSS before the first step is the steps' memory above the loaded model's (their
transient memory, plus the gradients and AdamW state, which stay: 3 × 4 bytes × 39M = 0.44 GiB). The variants' first
gradient norms are compared (the same weights and batch: they differ by float32 rounding only).

    python benchmarks/logit_chunk.py [--chunks 0,1024,256] [--steps 3]

Writes benchmarks/results/logit_chunk.json ({machine, threads, rows: [{logit_chunk, step_s (median),
steps, peak_rss_gib, step_rss_gib, first_grad_norm}]}) and a PNG.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, machine, write_results  # noqa: E402

sys.path.insert(0, str(ROOT))
VOCAB, THREADS, PROMPTS, N, P, R = 151_936, 2, 2, 8, 16, 128


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2**20


def build(directory: Path) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from policy.models import build_char_tokenizer, save_model
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=64, max_position_embeddings=512, tie_word_embeddings=True))
    save_model(model, build_char_tokenizer(), directory)


def one(model_dir: str, chunk: int, steps: int) -> dict:
    """One variant in this process: the step's seconds and memory."""
    import random

    import torch

    from orchestration.config import load_config
    from policy.batch import Group
    from policy.trainer import PolicyTrainer
    torch.set_num_threads(THREADS)
    cfg = load_config(None, ["trainer.shared_prompt=true", f"trainer.threads={THREADS}", "trainer.lr=1e-6",
                             f"trainer.logit_chunk={chunk}", "trainer.skip_zero_advantage=false"])
    trainer = PolicyTrainer(model_dir, cfg.trainer, cfg.algorithm, 1.0, R)
    rng = random.Random(0)
    groups = [Group(prompt=str(g), prompt_ids=[rng.randrange(2, VOCAB) for _ in range(P)],
                    responses=[[rng.randrange(2, VOCAB) for _ in range(R)] for _ in range(N)],
                    behaviour_logprobs=[[0.0] * R for _ in range(N)], version=0, completions=[""] * N,
                    rewards=[float(i % 2) for i in range(N)]) for g in range(PROMPTS)]
    before = rss_gib()
    first_grad_norm = trainer.step(groups)["grad_norm"]
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.step(groups)
        seconds.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"logit_chunk": chunk, "step_s": statistics.median(seconds), "steps": seconds,
            "peak_rss_gib": peak, "step_rss_gib": peak - before, "first_grad_norm": first_grad_norm}


def plot(result: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    labels = [str(r["logit_chunk"] or "all") for r in rows]
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_m.bar(labels, [r["step_rss_gib"] for r in rows])
    ax_m.set_ylabel("peak RSS above the loaded model's, GiB")
    ax_t.bar(labels, [r["step_s"] for r in rows], color="C1")
    ax_t.set_ylabel("step s (median)")
    for ax in (ax_m, ax_t):
        ax.set_xlabel("trainer.logit_chunk (tokens)")
    fig.suptitle(f"one GRPO step, {PROMPTS * N * R} response tokens, vocabulary {VOCAB:,}, {result['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", default="0,1024,256")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "logit_chunk.json"))
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # model_dir, chunk: one variant, in a child
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.steps)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        for chunk in (int(c) for c in args.chunks.split(",")):
            out = subprocess.run([sys.executable, __file__, "--one", tmp, str(chunk), "--steps", str(args.steps)],
                                 check=True, capture_output=True, text=True, cwd=ROOT).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"logit_chunk={chunk}: step {r['step_s']:.2f} s, peak RSS above the model's "
                  f"{r['step_rss_gib']:.2f} GiB "
                  f"(process {r['peak_rss_gib']:.2f}), first gradient norm {r['first_grad_norm']:.9g}", flush=True)
    write_results({"machine": machine(), "threads": THREADS, "rows": rows}, args.out, plot)


if __name__ == "__main__":
    main()
