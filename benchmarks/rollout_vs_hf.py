"""Rollout throughput: vLLM (rlaccel's engine) vs transformers ``generate`` (TRL without vLLM).

Same weights, same prompts, same number of sequences decoded together ("batch"), a fixed
number of new tokens per sequence (EOS ignored, so both produce identical token counts),
sampling at temperature 1. Both engines get the whole machine's threads. Decoded tokens
per second, best of ``--repeats`` after a warm-up.

    python benchmarks/rollout_vs_hf.py [--quick]

Writes benchmarks/results/rollout_vs_hf.json (a list of {model, batch, vllm_tok_s,
hf_tok_s, ...}) and rollout_vs_hf.png.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, write_results  # noqa: E402  (benchmarks/common.py)

sys.path.insert(0, str(ROOT))


def build(name: str, directory: Path) -> Path:
    from policy.models import build_char_tokenizer, build_model, save_model
    tokenizer = build_char_tokenizer()
    return save_model(build_model(name, tokenizer, seed=0), tokenizer, directory / name)


def prompts(batch: int, tokenizer) -> list[list[int]]:
    from orchestration.data import arithmetic_dataset
    rows = arithmetic_dataset(batch, 1, 3, "+-", seed=batch)
    return [tokenizer(r["prompt"], add_special_tokens=False).input_ids for r in rows]


def time_best(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_hf(model_dir: Path, batches: list[int], new_tokens: int, repeats: int) -> dict[int, float]:
    import torch
    from policy.models import load_model, load_tokenizer
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir).eval()
    out = {}
    for b in batches:
        ids = prompts(b, tok)
        width = max(map(len, ids))
        x = torch.full((b, width), tok.pad_token_id)
        mask = torch.zeros_like(x)
        for i, p in enumerate(ids):
            x[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1

        def run():
            with torch.no_grad():
                model.generate(input_ids=x, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               pad_token_id=tok.pad_token_id)
        out[b] = b * new_tokens / time_best(run, repeats)
        print(f"  hf    batch {b:3d}: {out[b]:9.1f} tok/s", flush=True)
    return out


def bench_vllm(model_dir: Path, batches: list[int], new_tokens: int, repeats: int) -> dict[int, float]:
    from policy.models import load_tokenizer
    from rollout.vllm_adapter import set_engine_env
    set_engine_env(kv_cache_gib=2, threads=os.cpu_count() or 1)
    from vllm import LLM, SamplingParams
    tok = load_tokenizer(model_dir)
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    params = SamplingParams(temperature=1.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True,
                            logprobs=0, detokenize=False)
    out = {}
    for b in batches:
        ids = prompts(b, tok)

        def run():
            res = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
            assert all(len(r.outputs[0].token_ids) == new_tokens for r in res)
        out[b] = b * new_tokens / time_best(run, repeats)
        print(f"  vllm  batch {b:3d}: {out[b]:9.1f} tok/s", flush=True)
    del llm
    gc.collect()
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows}, key=["tiny", "small"].index)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4))
    for ax, m in zip(axes if len(models) > 1 else [axes], models):
        rs = [r for r in rows if r["model"] == m]
        b = [r["batch"] for r in rs]
        ax.plot(b, [r["vllm_tok_s"] for r in rs], "o-", label="vLLM (rlaccel)")
        ax.plot(b, [r["hf_tok_s"] for r in rs], "s--", label="transformers generate (TRL default)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequences decoded together")
        ax.set_ylabel("decoded tokens / s")
        ax.set_title(f"{m} model, {rs[0]['new_tokens']} new tokens, {os.cpu_count()} CPU threads")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, two batch sizes (smoke run)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "rollout_vs_hf.json"))
    args = parser.parse_args()
    import torch
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    plan = {"tiny": ([1, 4, 16, 64, 256], 64), "small": ([1, 4, 16, 64], 32)}
    if args.quick:
        plan = {"tiny": ([1, 16], 16)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (batches, new_tokens) in plan.items():
            model_dir = build(name, Path(tmp))
            print(f"{name}: {new_tokens} new tokens per sequence", flush=True)
            hf = bench_hf(model_dir, batches, new_tokens, args.repeats)
            vl = bench_vllm(model_dir, batches, new_tokens, args.repeats)
            rows += [{"model": name, "batch": b, "vllm_tok_s": vl[b], "hf_tok_s": hf[b], "speedup": vl[b] / hf[b],
                      "new_tokens": new_tokens, "threads": threads, "machine": platform.processor() or platform.machine()}
                     for b in batches]
    write_results(rows, args.out, plot)
    for r in rows:
        print(f"{r['model']:5s} batch {r['batch']:3d}: vLLM {r['vllm_tok_s']:9.1f}  HF {r['hf_tok_s']:9.1f} tok/s  "
              f"-> {r['speedup']:.2f}x")


if __name__ == "__main__":
    main()
