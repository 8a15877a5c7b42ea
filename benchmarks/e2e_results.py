"""The end-to-end benchmark's results (benchmarks/e2e_vs_trl.py): a run's per-step records
summarised into a results row, the markdown tables and the plot of the rows."""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

WINDOW = 10  # steps in the moving mean of the reward that the target and the levels are read from


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def moving(rewards: list[float]) -> list[float]:
    return [sum(rewards[max(0, i - WINDOW + 1):i + 1]) / min(i + 1, WINDOW) for i in range(len(rewards))]


def summarize(steps: list[dict], target: float | None, samples_per_step: int) -> dict:
    """steps: per optimizer step {wall (s since the end of step 0), reward, rollout_s, update_s,
    rollout_tokens, update_tokens}; step 0 is dropped from the timings."""
    rewards = [s["reward"] for s in steps]
    avg = moving(rewards)
    timed = steps[1:]
    wall = timed[-1]["wall"] if timed else float("nan")
    curve = [(s["wall"], a, samples_per_step * (i + 1)) for i, (s, a) in enumerate(zip(steps, avg))]
    tail = max(1, len(rewards) // 10)
    # a timed step's seconds; their median is robust to a run's few slow steps (warm-up, a stall)
    median_step = statistics.median(b["wall"] - a["wall"] for a, b in zip(steps, timed)) if timed else None
    total = lambda k: sum(s.get(k, 0.0) for s in timed)  # noqa: E731
    return {"wall_s_to_target": time_to(curve, target) if target is not None else None, "target_reward": target,
            "final_reward": sum(rewards[-tail:]) / tail,
            "samples": samples_per_step * len(steps), "steps": len(steps), "wall_s_total": wall,
            "samples_per_s": samples_per_step * len(timed) / wall if timed and wall > 0 else None,
            "median_step_s": median_step,
            "samples_per_s_median_step": samples_per_step / median_step if median_step else None,
            "rollout_tok_s": total("rollout_tokens") / total("rollout_s") if total("rollout_s") else None,
            "update_tok_s": total("update_tokens") / total("update_s") if total("update_s") else None,
            # where a step's time goes (means after step 0): sampling, the update, the weight sync
            "step_breakdown_s": {k: total(k) / len(timed) for k in ("rollout_s", "update_s", "sync_s")} if timed else {},
            "curve": curve}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({(r["model"], r["prompt"]) for r in rows}, key=lambda k: (k[0] != "tiny", k[1] != "short"))
    fig, axes = plt.subplots(len(keys), 2, figsize=(12, 3.4 * len(keys)), squeeze=False)
    for (model, prompt), (ax_t, ax_s) in zip(keys, axes):
        shown = [r for r in rows if (r["model"], r["prompt"]) == (model, prompt) and r["seed"] == 0]
        for i, r in enumerate(shown):  # bfloat16 systems dashed; 20 colours, as a cell has up to ~17 systems
            wall, avg, samples = zip(*r["curve"])
            style = dict(label=r["system"], color=plt.cm.tab20(i % 20),
                         ls="--" if r["system"].endswith(BF16) else "-")
            ax_t.plot(wall, avg, **style)
            ax_s.plot(samples, avg, **style)
        target = next((r["target_reward"] for r in rows if (r["model"], r["prompt"]) == (model, prompt)), None)
        for ax, xlabel in ((ax_t, "wall-clock s after step 0"), (ax_s, "samples")):
            if target is not None:
                ax.axhline(target, color="grey", ls=":")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"reward ({WINDOW}-step avg)")
            ax.set_title(f"{model} model, {prompt} prompts, seed 0")
        ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def time_to(curve: list, level: float) -> float | None:
    """Wall s after step 0 at which a run's 10-step mean reward first reaches ``level`` (the
    rule of ``wall_s_to_target``)."""
    return next((wall for i, (wall, avg, _) in enumerate(curve) if i >= WINDOW - 1 and avg >= level), None)


def samples_to(curve: list, level: float) -> int | None:
    """Samples trained by the step at which :func:`time_to` reads the level (the same rule)."""
    return next((n for i, (_, avg, n) in enumerate(curve) if i >= WINDOW - 1 and avg >= level), None)


def levels_table(rows: list[dict], samples: bool = False) -> str:
    """Markdown: for the cells with a target, the seconds (or, with ``samples``, the samples) to
    reward levels up to it, per system (the mean over its seeds where every seed reached the level,
    else how many did; for samples also each seed's at the target: learning per sample, which
    exact accelerations leave unchanged). One machine's runs can all learn more slowly than
    another's (README, Performance): the target then says little, and the lower levels still
    compare the systems."""
    reads, unit, fmt = (samples_to, "samples", "{:,.0f}") if samples else (time_to, "s", "{:.1f}")
    lines = []
    for (model, prompt) in sorted({(r["model"], r["prompt"]) for r in rows if r["target_reward"] is not None}):
        cell = [r for r in rows if (r["model"], r["prompt"]) == (model, prompt) and "curve" in r]
        target = cell[0]["target_reward"]
        levels = [round(target - d, 3) for d in (0.08, 0.06, 0.04, 0.02, 0.0)]
        per_seed = " | per seed to the target" if samples else ""
        lines += [f"| {model} {prompt}: {unit} to reward | " + " | ".join(f"{x:.2f}" for x in levels) + f"{per_seed} |",
                  "|---|" + "---|" * (len(levels) + bool(samples))]
        for system in dict.fromkeys(r["system"] for r in cell):
            runs = [r for r in cell if r["system"] == system]
            cells = []
            for level in levels:
                hits = [reads(r["curve"], level) for r in runs]
                reached = [h for h in hits if h is not None]
                cells.append(fmt.format(sum(reached) / len(reached)) if len(reached) == len(hits)
                             else f"{len(reached)} of {len(hits)} reached")
            if samples:
                cells.append(" / ".join("–" if h is None else f"{h:,}"
                                        for h in (reads(r["curve"], target) for r in runs)))
            lines.append(f"| {system} ({len(runs)} seed{'s' if len(runs) > 1 else ''}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# A bfloat16 system's name ends with this (e2e_vs_trl.py: trl_bf16, rlaccel_all_bf16, ...).
BF16 = "_bf16"


def same_precision(system: str, base: str) -> str:
    """The baseline ``base`` ("trl", "rlaccel_plain") in ``system``'s precision: a bfloat16 system
    (``_bf16``) is compared with the bfloat16 baseline, a float32 one with the float32 one."""
    return base + BF16 if system.endswith(BF16) else base


def table(rows: list[dict]) -> str:
    """Markdown: per cell and system, means over seeds, and speed relative to TRL and rlaccel_plain
    in the same precision (same_precision)."""
    lines = ["| model | prompt | system | seeds | s to target | final reward | samples/s | vs TRL | vs plain "
             "| median step s | vs TRL (median steps) | rollout tok/s | update tok/s | start-up s "
             "| s to target with start-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_cell: dict = {}
    for r in rows:
        by_cell.setdefault((r["model"], r["prompt"]), {}).setdefault(r["system"], []).append(r)
    fmt = lambda x, f="{:.1f}": "–" if x is None else f.format(x)  # noqa: E731
    for (model, prompt), systems in by_cell.items():
        sps = {s: mean([r["samples_per_s"] for r in rs if r["samples_per_s"]]) for s, rs in systems.items()}
        # rows from before the median was recorded have none
        med = {s: mean([r["median_step_s"] for r in rs if r.get("median_step_s")]) for s, rs in systems.items()}
        for s, rs in systems.items():
            trl, plain = same_precision(s, "trl"), same_precision(s, "rlaccel_plain")
            hits = [r["wall_s_to_target"] for r in rs]
            to_target = mean(hits) if all(h is not None for h in hits) else None
            setup = [r["setup_s"] for r in rs if r.get("setup_s") is not None]  # start-up and the warm-up step
            lines.append(f"| {model} | {prompt} | {s} | {len(rs)} | "
                         f"{fmt(to_target) if rs[0]['target_reward'] is not None else 'n/a'}"
                         f"{'' if all(h is not None for h in hits) or rs[0]['target_reward'] is None else ' (not all)'} | "
                         f"{fmt(mean([r['final_reward'] for r in rs]), '{:.3f}')} | {fmt(sps[s], '{:.1f}')} | "
                         f"{fmt(sps[s] / sps[trl] if sps.get(trl) and sps[s] else None, '{:.2f}x')} | "
                         f"{fmt(sps[s] / sps[plain] if sps.get(plain) and sps[s] else None, '{:.2f}x')} | "
                         f"{fmt(med[s], '{:.2f}')} | "
                         f"{fmt(med[trl] / med[s] if med.get(trl) and med[s] else None, '{:.2f}x')} | "
                         f"{fmt(mean([r['rollout_tok_s'] for r in rs if r['rollout_tok_s']]), '{:.0f}')} | "
                         f"{fmt(mean([r['update_tok_s'] for r in rs if r['update_tok_s']]), '{:.0f}')} | "
                         f"{fmt(mean(setup) if len(setup) == len(rs) else None)} | "
                         f"{fmt(mean([h + u for h, u in zip(hits, setup)]) if to_target is not None and len(setup) == len(rs) else None)} |")
    return "\n".join(lines)


# The async variants, whose update and rollout run on one core each (e2e_vs_trl.ASYNC_THREADS).
ONE_THREAD = ("rlaccel_all", "rlaccel_nospec", "rlaccel_async")


def ceiling_table(rows: list[dict]) -> str:
    """Markdown: per cell and precision, the fastest rlaccel_all could go on the run's 2 cores with its update and
    its rollout as measured and nothing else: no weight sync, no wait, the two phases' core-seconds
    split evenly over the 2 cores (a step of (update + rollout) / 2). The update is rlaccel_all's
    (shared prompt, one thread), the rollout the fastest one-thread rollout of the async variants
    (with the drafter or without it); means of their timed steps. Running a phase on 2 threads
    costs more core-seconds, not fewer, so this bounds every split of these two phases. What a
    system gains beyond it must come from a cheaper update or rollout, not from scheduling."""
    lines = ["| model | prompt | precision | update s (1 thread) | rollout s (1 thread) | sync s | rlaccel_all step s "
             "| bound step s | TRL step s | rlaccel_all vs TRL | bound vs TRL |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    cells = dict.fromkeys((r["model"], r["prompt"]) for r in rows)
    for (model, prompt), suffix in itertools.product(cells, ("", BF16)):
        cell = [r for r in rows if (r["model"], r["prompt"]) == (model, prompt) and r.get("step_breakdown_s")]
        phase = lambda system, key: mean([r["step_breakdown_s"][key] for r in cell if r["system"] == system])  # noqa: E731
        step = lambda system: mean([r["samples"] / r["steps"] / r["samples_per_s"]  # noqa: E731
                                    for r in cell if r["system"] == system and r["samples_per_s"]])
        all_ = f"rlaccel_all{suffix}"
        rollouts = {s + suffix: t for s in ONE_THREAD if (t := phase(s + suffix, "rollout_s")) is not None}
        update, trl, actual = phase(all_, "update_s"), step(f"trl{suffix}"), step(all_)
        if update is None or not rollouts or trl is None:
            continue
        fastest = min(rollouts, key=rollouts.get)
        bound = (update + rollouts[fastest]) / 2
        lines.append(f"| {model} | {prompt} | {'bfloat16' if suffix else 'float32'} | {update:.2f} | "
                     f"{rollouts[fastest]:.2f} ({fastest}) | "
                     f"{phase(all_, 'sync_s'):.2f} | {actual:.2f} | {bound:.2f} | {trl:.2f} | "
                     f"{trl / actual:.2f}x | {trl / bound:.2f}x |")
    return "\n".join(lines)


def report(rows: list[dict]) -> str:
    """The run's markdown: the systems' table, the seconds' and the samples' to reward levels, the bound's."""
    return "\n\n".join(t for t in (table(rows), levels_table(rows), levels_table(rows, samples=True),
                                     ceiling_table(rows)) if t)
