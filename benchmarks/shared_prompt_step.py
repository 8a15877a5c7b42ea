"""One GRPO trainer step, packed (shared prompt) vs unpacked, on the same groups.

For each grid point (N responses, prompt length P, response length R): two groups of N
responses, one ``PolicyTrainer.step`` (forward, backward, AdamW) with
``trainer.shared_prompt`` off (N rows of P+R, transformers SDPA) and on (one row of P+NR per
group) with each attention backend. Every variant runs in its own subprocess so that its
peak RSS is its own. Model: a ~12M-parameter Qwen3 (hidden 256, 6 layers, GQA 8/4, 8k vocab).

    python benchmarks/shared_prompt_step.py [--quick]

Writes benchmarks/results/shared_prompt_step.json (a list of {N, P, R, rho, speedup,
peak_rss_mb_packed, peak_rss_mb_unpacked, ...}; speedup = unpacked / best packed) and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, write_results  # noqa: E402  (benchmarks/common.py)

sys.path.insert(0, str(ROOT))
GRID = [(8, 128, 32), (16, 256, 32), (8, 256, 64), (16, 512, 64), (8, 128, 128), (8, 2048, 128)]
QUICK_GRID = [(8, 128, 32), (8, 256, 64)]
VARIANTS = ["unpacked", "reference", "regions"]


def build_model(directory: Path) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from policy.models import build_char_tokenizer
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=4096,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    Qwen3ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def run_variant(model_dir: str, variant: str, N: int, P: int, R: int, repeats: int) -> dict:
    """In a fresh process: median seconds of one trainer step, and peak RSS."""
    import random

    import torch

    from orchestration.config import load_config
    from policy.batch import Group
    from policy.trainer import PolicyTrainer
    threads = os.cpu_count() or 1
    overrides = [f"trainer.threads={threads}", f"trainer.micro_batch_size={2 * N}", "trainer.lr=1e-5"]
    if variant != "unpacked":
        overrides += ["trainer.shared_prompt=true", f"trainer.attention_backend={variant}"]
    cfg = load_config(None, overrides)
    trainer = PolicyTrainer(model_dir, cfg.trainer, cfg.algorithm, temperature=1.0, max_tokens=R)
    rng = random.Random(0)
    groups = []
    for g in range(2):
        prompt = [rng.randrange(2, 8192) for _ in range(P)]
        responses = [[rng.randrange(2, 8192) for _ in range(R)] for _ in range(N)]
        groups.append(Group(prompt=str(g), prompt_ids=prompt, responses=responses,
                            behaviour_logprobs=[[0.0] * R for _ in range(N)], version=0,
                            rewards=[rng.random() for _ in range(N)]))
    trainer.step(groups)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        trainer.step(groups)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"seconds": times[len(times) // 2], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"N={r['N']}\nP={r['P']}\nR={r['R']}" for r in rows]
    x = range(len(rows))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    a1.bar([i - 0.3 for i in x], [r["rho"] for r in rows], 0.2, label="token reduction ρ")
    a1.bar([i - 0.1 for i in x], [r["speedup_regions"] for r in rows], 0.2, label="speedup, regions")
    a1.bar([i + 0.1 for i in x], [r["speedup_reference"] for r in rows], 0.2, label="speedup, dense-mask reference")
    a1.bar([i + 0.3 for i in x], [0.95 * r["rho"] for r in rows], 0.2, label="target 0.95·ρ", alpha=0.4)
    a1.set_xticks(list(x), labels, fontsize=8)
    a1.set_ylabel("unpacked step time / packed step time")
    a1.set_title("GRPO trainer step (fwd+bwd+AdamW), 12M Qwen3, 2 groups")
    a1.legend(fontsize=8)
    a2.bar([i - 0.2 for i in x], [r["peak_rss_mb_unpacked"] for r in rows], 0.4, label="unpacked")
    a2.bar([i + 0.2 for i in x], [r["peak_rss_mb_packed"] for r in rows], 0.4, label="packed (best backend)")
    a2.set_xticks(list(x), labels, fontsize=8)
    a2.set_ylabel("peak RSS (MB)")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "shared_prompt_step.json"))
    parser.add_argument("--worker", nargs=6, metavar=("MODEL", "VARIANT", "N", "P", "R", "REPEATS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, variant, N, P, R, repeats = args.worker
        print(json.dumps(run_variant(model, variant, int(N), int(P), int(R), int(repeats))))
        return
    from attention.layout import token_reduction
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp))
        for N, P, R in (QUICK_GRID if args.quick else GRID):
            repeats = 1 if P >= 2048 else args.repeats
            res = {}
            for variant in VARIANTS:
                out = subprocess.run([sys.executable, __file__, "--worker", tmp, variant, str(N), str(P), str(R),
                                      str(repeats)], capture_output=True, text=True, check=True)
                res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            best = min(("reference", "regions"), key=lambda v: res[v]["seconds"])
            row = {"N": N, "P": P, "R": R, "rho": token_reduction(P, [R] * N),
                   "speedup": res["unpacked"]["seconds"] / res[best]["seconds"], "best_backend": best,
                   "speedup_regions": res["unpacked"]["seconds"] / res["regions"]["seconds"],
                   "speedup_reference": res["unpacked"]["seconds"] / res["reference"]["seconds"],
                   "peak_rss_mb_packed": res[best]["peak_rss_mb"], "peak_rss_mb_unpacked": res["unpacked"]["peak_rss_mb"],
                   "seconds": {v: res[v]["seconds"] for v in VARIANTS}, "threads": res["unpacked"]["threads"]}
            rows.append(row)
            print(f"N={N:2d} P={P:4d} R={R:3d}  rho={row['rho']:.2f}  unpacked {res['unpacked']['seconds']:.2f}s  "
                  f"reference {res['reference']['seconds']:.2f}s  regions {res['regions']['seconds']:.2f}s  "
                  f"-> {row['speedup']:.2f}x ({best}; {row['speedup'] / row['rho']:.2f} of rho)  "
                  f"RSS {row['peak_rss_mb_unpacked']:.0f} -> {row['peak_rss_mb_packed']:.0f} MB", flush=True)
    write_results(rows, args.out, plot)


if __name__ == "__main__":
    main()
