"""Adaptive speculation on an RL rollout call: does it ever make the rollout slower?

The tiny preset's rollout call (32 prompts x 8 responses, at most 8 tokens each): the live batch
starts at 256 and shrinks to a short tail of few sequences, where the per-batch-size schedule
(rollout/adaptive.py) speculates. Per call, side by side in one process and interleaved (a slow
spell on a shared machine hits every mode alike), the prefix cache reset before every call as
an RL weight sync does:

  plain      an engine without drafter
  schedule   the speculative engine under its derived schedule alone (rollout.adaptive_check=false)
  check      the same engine with the schedule check on (the default): schedule vs off, timed live
  off        the speculative engine with speculation off for the whole call (the check's "off" arm)

    python benchmarks/spec_rl_tail.py [--quick] [--head DIR]

--head takes a trained drafter (``python -m mtp.train``); without it a TV head is trained first
(~2.5 min). Writes benchmarks/results/spec_rl_tail.json (seconds per call for every mode, the
schedule, per-call arms of the check) and spec_rl_tail.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, write_results  # noqa: E402  (benchmarks/common.py)

sys.path.insert(0, str(ROOT))
K = 3


def measure(head: str, calls: int) -> dict:
    from orchestration.config import load_config
    from orchestration.data import load_prompts
    from orchestration.model_prep import prepare_model
    from policy.models import load_tokenizer
    from rollout.adaptive import ScheduleCheck
    from rollout.vllm_engine import VLLMEngine

    class AlwaysOff(ScheduleCheck):
        """The check's "off" arm on every call."""
        def arm(self, shape):
            return self.OFF
    config = load_config("configs/tiny.yaml", [])
    model_dir = str(prepare_model(config, progress=False))
    tok = load_tokenizer(model_dir)
    rows = load_prompts(config.data, tok)
    per_call = config.algorithm.prompts_per_step
    batches = [[tok(r["prompt"], add_special_tokens=False).input_ids for r in rows[i * per_call:(i + 1) * per_call]]
               for i in range(calls)]
    plain = VLLMEngine(model_dir, config.rollout, config.model.dtype, 0)
    # no exploring calls (rollout.adaptive_explore): the modes share this engine's call counter, and
    # every exploring call would fall on the same mode
    spec = VLLMEngine(model_dir, dataclasses.replace(config.rollout, draft_model=head, num_speculative_tokens=K,
                                                     adaptive_spec=True, adaptive_explore=0), config.model.dtype, 0)
    check = spec.check or ScheduleCheck()
    modes = {"plain": (plain, None), "schedule": (spec, None), "check": (spec, check), "off": (spec, AlwaysOff())}
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    arms: list[float] = []
    for e in (plain, spec):  # warm-up (oneDNN primitives for the first shapes)
        e.generate(batches[0], 0)
    names = list(modes)
    for i, ids in enumerate(batches):
        for mode in names[i % len(names):] + names[:i % len(names)]:  # rotated: no mode always follows another
            engine, mode_check = modes[mode]
            engine.check = mode_check
            engine.llm.reset_prefix_cache()
            t0 = time.perf_counter()
            engine.generate(ids, i)
            seconds[mode].append(time.perf_counter() - t0)
            if mode == "check":
                arms.append(engine.last_call["metrics"].get("spec_off_calls", 0.0))
        if (i + 1) % 10 == 0:
            print(f"call {i + 1}/{calls}: " + ", ".join(f"{m} {sum(v) / len(v):.3f}s" for m, v in seconds.items()),
                  flush=True)
    mean = {m: sum(v) / len(v) for m, v in seconds.items()}
    return {"model": "tiny (~1M Qwen3)", "call": f"{per_call} prompts x {config.rollout.n}, max "
            f"{config.rollout.max_tokens} tokens", "calls": calls, "schedule": spec.adaptive.schedule,
            "step_s": {str(b): {str(k): s for k, s in ks.items()} for b, ks in spec.adaptive.step_s.items()},
            "acceptance_per_pos": spec.adaptive.acceptance, "mean_s_per_call": mean,
            "vs_plain": {m: mean[m] / mean["plain"] for m in mean}, "check_off_calls": arms,
            "check_winner": check.winner((per_call, config.rollout.n, config.rollout.max_tokens)),
            "seconds_per_call": seconds}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for mode, values in result["seconds_per_call"].items():
        ax.plot(range(1, len(values) + 1), values, label=f"{mode} ({result['vs_plain'][mode]:.2f}x plain's time)")
    ax.set_xlabel("rollout call")
    ax.set_ylabel("seconds per call")
    ax.set_title(f"tiny RL rollout call ({result['call']}), schedule {result['schedule']}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short head training and 12 calls (smoke)")
    parser.add_argument("--head", default=None, help="a trained drafter directory (default: train one)")
    parser.add_argument("--out", default=str(RESULTS / "spec_rl_tail.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        head = args.head
        if head is None:
            from mtp.train import train
            from orchestration.config import load_config
            head = str(Path(tmp) / "head")
            steps = ["mtp.steps=100", "mtp.warm_steps=30", "mtp.prompts=128"] if args.quick else \
                ["mtp.steps=1500", "mtp.warm_steps=300", "mtp.lr=2e-3"]
            print("training a TV drafter head on the tiny preset ...", flush=True)
            train(load_config("configs/tiny.yaml", ["mtp.objective=tv", f"mtp.k={K}", f"mtp.out={head}",
                                                    f"logging.dir={Path(tmp) / 'mtp-run'}", *steps]), progress=False)
        result = measure(head, 12 if args.quick else 60)
    print(f"schedule {result['schedule']}; seconds per call: " +
          ", ".join(f"{m} {s:.3f} ({result['vs_plain'][m]:.2f}x plain)" for m, s in result["mean_s_per_call"].items()) +
          f"; the check ran {sum(result['check_off_calls']):.0f} of {result['calls']} calls with speculation off",
          flush=True)
    write_results(result, args.out, plot)


if __name__ == "__main__":
    main()
