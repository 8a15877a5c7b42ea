"""A CPU rollout worker's side of one weight sync (checksum, vLLM in-place reload, probe), side by side.

On the 100M preset, in one worker process (rollout.worker.RolloutWorker with its vLLM engine, no
Ray; with a run's worker allocator settings, ``orchestration.keep_freed_memory``), the same weights
loaded again and again, the variants alternating (two: A B B A A B ...; three: round-robin;
the first sync of each variant is dropped as warm-up):

  reload   vLLM's reload as before 45b489b (``worker.reload_weights`` packing the vocabulary matrix
           for the embedding and the tied head, then the adapter's repack) against
           ``rollout.vllm_adapter.reload_weights`` (packed once), on an engine that dropped its
           linear weights (``rollout.cpu_keep_weights=false``); a 32-token probe in both
  probe    the probe as the whole first prompt and answer of the long-prompt cell (a 32-example
           few-shot block: ~320 tokens) against its last ``orchestration.grpo.PROBE_TOKENS``, and
           no probe (checksum only), with the current reload (the default engine's)
  keep     an engine that kept its linear weights beside their packed kernels
           (``rollout.cpu_keep_weights``, the default: an update copies into them and repacks)
           against one that dropped them (vLLM's layerwise reload, packing the vocabulary matrix
           once), a second worker in the same process; a 32-token probe in both

    python benchmarks/cpu_sync.py [--threads 2] [--rounds 6]

Writes benchmarks/results/cpu_sync.json ({machine, threads, rows: [{comparison, variant, sync_s
(median), syncs: [...]}]}) and a PNG.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import (RESULTS, ROOT, alternating, machine, plot_medians, with_run_allocator,  # noqa: E402
                    write_results)

sys.path.insert(0, str(ROOT))
LONG = ["data.few_shot=32", "data.max_prompt_tokens=384", "rollout.max_model_len=480"]


def vllm_reload_before(llm, state_dict) -> None:
    """The adapter's reload before 45b489b: vLLM's own in-place reload, then the tied head's repack."""
    from rollout.vllm_adapter import _repack_tied_lm_head
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state_dict.items())})
    llm.collective_rpc(_repack_tied_lm_head)
    llm.reset_prefix_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6, help="syncs per variant (the first dropped)")
    parser.add_argument("--out", default=str(RESULTS / "cpu_sync.json"))
    args = parser.parse_args()
    with_run_allocator()

    import torch

    import rollout.vllm_engine as vllm_engine
    from orchestration.config import load_config
    from orchestration.data import load_prompts
    from orchestration.grpo import PROBE_TOKENS
    from orchestration.model_prep import prepare_model
    from policy.models import load_model, load_tokenizer, pack_state, state_checksum
    from rollout.vllm_adapter import reload_weights, set_engine_env
    # every sync that is sent a probe runs it (the default probes every 8th: rollout.sync_probe_every)
    config = load_config("configs/small.yaml", [f"rollout.threads={args.threads}", *LONG, "rollout.sync_probe_every=1"])
    model_dir = prepare_model(load_config("configs/small.yaml"))  # the long cell's prompts, the short cell's model
    set_engine_env(config.rollout.kv_cache_gib, args.threads)
    torch.set_num_threads(args.threads)
    from rollout.worker import RolloutWorker
    worker = RolloutWorker(str(model_dir), config.rollout, "float32", 0)
    dropped = RolloutWorker(str(model_dir), load_config("configs/small.yaml", [
        f"rollout.threads={args.threads}", *LONG, "rollout.sync_probe_every=1", "rollout.cpu_keep_weights=false"]).rollout,
        "float32", 0)
    assert worker.engine.copy_reload and not dropped.engine.copy_reload
    tokenizer = load_tokenizer(model_dir)
    row = load_prompts(config.data, tokenizer)[0]
    whole = tokenizer(row["prompt"] + row["answer"], add_special_tokens=False).input_ids
    state = {k: v.detach().clone() for k, v in load_model(model_dir).state_dict().items()}

    def sync(reload, probe, on=worker) -> float:
        vllm_engine.reload_weights = reload
        t0 = time.perf_counter()
        on.update_weights(pack_state(state), on.version + 1, state_checksum(state),
                          None if probe is None else (probe, None))
        return time.perf_counter() - t0

    comparisons = {
        "reload": {"vllm_reload_before": (vllm_reload_before, whole[-PROBE_TOKENS:], dropped),
                   "packed_once": (reload_weights, whole[-PROBE_TOKENS:], dropped)},
        "probe": {f"whole_prompt_{len(whole)}": (reload_weights, whole),
                  f"last_{PROBE_TOKENS}": (reload_weights, whole[-PROBE_TOKENS:]),
                  "no_probe": (reload_weights, None)},
        "keep": {"kept_copy": (reload_weights, whole[-PROBE_TOKENS:], worker),
                 "dropped_layerwise": (reload_weights, whole[-PROBE_TOKENS:], dropped)},
    }
    rows = []
    try:
        for name, variants in comparisons.items():
            times = {v: [] for v in variants}
            for v in alternating(list(variants), args.rounds):
                times[v].append(sync(*variants[v]))
                print(f"{name:7s} {v:22s} {times[v][-1]:.3f} s", flush=True)
            rows += [{"comparison": name, "variant": v, "sync_s": statistics.median(t[1:]), "syncs": t}
                     for v, t in times.items()]
    finally:
        vllm_engine.reload_weights = reload_weights
    for r in rows:
        print(f"{r['comparison']:7s} {r['variant']:22s} median {r['sync_s']:.3f} s")
    write_results({"machine": machine(), "threads": args.threads, "rows": rows}, args.out, plot)


def plot(result: dict, path) -> None:
    rows = result["rows"]
    colours = {"reload": "C0", "probe": "C1", "keep": "C2"}
    plot_medians(path, [f"{r['comparison']}: {r['variant']}" for r in rows], [r["syncs"] for r in rows],
                 f"worker sync, s (median; dots: each sync after the first), {result['threads']} threads",
                 "100M preset: a CPU worker's weight sync", [colours.get(r["comparison"], "C3") for r in rows])


if __name__ == "__main__":
    main()
