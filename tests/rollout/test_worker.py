"""The rollout worker on the transformers engine (fast; the vLLM engine has its own tests)."""

import math

import pytest
import torch

from orchestration.config import load_config
from policy.batch import pad_sequences
from policy.models import load_model, pack_state, probe_logprobs, state_checksum
from policy.trainer import token_logprobs
from rollout.worker import RolloutWorker, WeightSyncError

ROWS = [(0, {"prompt": "12+7=", "answer": "19"}), (1, {"prompt": "3-5=", "answer": "-2"})]


@pytest.fixture()
def worker(tiny_model_dir):
    cfg = load_config(None, ["rollout.backend=hf", "rollout.n=3", "rollout.max_tokens=5", "rollout.temperature=0.8",
                             "rollout.sync_probe_every=1"])  # the probe's checks at every update
    return RolloutWorker(str(tiny_model_dir), cfg.rollout)


def test_generate_groups_with_behaviour_logprobs(worker, tiny_model_dir):
    groups, metrics = worker.generate(ROWS, seed=1)
    assert [g.index for g in groups] == [0, 1] and all(g.n == 3 for g in groups)
    assert groups[0].row["answer"] == "19" and groups[0].version == 0
    assert metrics["rollout_tokens"] == sum(len(r) for g in groups for r in g.responses)
    model = load_model(tiny_model_dir).eval()
    for g in groups:
        batch = pad_sequences([g.prompt_ids] * g.n, g.responses, 0)
        with torch.no_grad():
            ref = token_logprobs(model, batch, temperature=0.8)
        for i, lps in enumerate(g.behaviour_logprobs):
            # same float32 forward, different batch padding: rounding-level differences only
            assert torch.allclose(ref[i, :len(lps)], torch.tensor(lps), atol=1e-5, rtol=0)
    again, _ = worker.generate(ROWS, seed=1)
    assert [g.responses for g in again] == [g.responses for g in groups]


def test_update_refuses_corrupted_weights(worker, tiny_model_dir_b):
    state = load_model(tiny_model_dir_b).state_dict()
    checksum = state_checksum(state)
    state["model.norm.weight"] = state["model.norm.weight"] + 1e-3  # corrupted in transit
    with pytest.raises(WeightSyncError, match="corrupted"):
        worker.update_weights(pack_state(state), 1, checksum)
    with pytest.raises(WeightSyncError, match="cannot be verified"):  # no checksum (a GPU sender) and no probe
        worker.update_weights(pack_state(state), 1, None, None)
    assert worker.version == 0


def test_update_is_verified_by_the_probe(worker, tiny_model_dir, tiny_model_dir_b, monkeypatch):
    """With no reference logprobs sent (a CPU trainer), the worker computes them from the weights
    it received; an engine that did not take those weights (an adapter failure) is caught."""
    probe_ids = [3, 4, 74, 5, 82, 6]
    state_b = load_model(tiny_model_dir_b).state_dict()
    metrics = worker.update_weights(pack_state(state_b), 1, state_checksum(state_b), (probe_ids, None))
    assert worker.version == 1 and metrics["sync_probe_diff"] < 1e-5
    # The engine's logprobs after the update are those of model b itself ...
    got = torch.tensor(worker.engine.prompt_logprobs(probe_ids))
    assert torch.allclose(got, torch.tensor(probe_logprobs(load_model(tiny_model_dir_b).eval(), probe_ids)), atol=1e-5)
    # ... and an engine that kept other weights is caught.
    state_a = load_model(tiny_model_dir).state_dict()
    monkeypatch.setattr(worker.engine, "load_weights", lambda state_dict: None)
    with pytest.raises(WeightSyncError, match="not sampling with the new weights"):
        worker.update_weights(pack_state(state_a), 2, state_checksum(state_a), (probe_ids, None))
    assert worker.version == 1
    # ... and the worker refuses to sample with unverified weights until a verified update
    with pytest.raises(WeightSyncError, match="refusing to sample"):
        worker.generate(ROWS, seed=0)
    monkeypatch.undo()
    worker.update_weights(pack_state(state_b), 3, state_checksum(state_b), (probe_ids, None))
    assert worker.version == 3 and worker.generate(ROWS, seed=0)[0][0].version == 3


def test_update_is_verified_against_the_trainers_reference_when_sent(worker, tiny_model_dir, tiny_model_dir_b,
                                                                     monkeypatch):
    """A GPU trainer sends its own probe logprobs: the engine must give those."""
    probe_ids = [3, 4, 74, 5, 82, 6]
    model_b = load_model(tiny_model_dir_b).eval()
    expected_b = probe_logprobs(model_b, probe_ids)
    state_b = model_b.state_dict()
    assert worker.update_weights(pack_state(state_b), 1, state_checksum(state_b), (probe_ids, expected_b))[
        "sync_probe_diff"] < 1e-5
    state_a = load_model(tiny_model_dir).state_dict()  # delivered intact, but not what the probe was computed for
    with pytest.raises(WeightSyncError, match="not sampling with the new weights"):
        worker.update_weights(pack_state(state_a), 2, state_checksum(state_a), (probe_ids, expected_b))
    assert worker.version == 1
    # an engine giving NaN at any position fails the probe (Python's max() skips a NaN after the first item)
    monkeypatch.setattr(worker.engine, "prompt_logprobs", lambda ids: [*expected_b[:-1], float("nan")])
    with pytest.raises(WeightSyncError, match="differ from the reference ones for the same weights by inf"):
        worker.update_weights(pack_state(state_b), 3, state_checksum(state_b), (probe_ids, expected_b))
    # a reference that is not finite is a diverged policy, named as such
    with pytest.raises(WeightSyncError, match="version 4 gives non-finite logprobs.*diverged"):
        worker.update_weights(pack_state(state_b), 4, state_checksum(state_b), (probe_ids, [math.nan] * len(expected_b)))


def test_a_checksummed_update_probes_on_the_first_every_nth_and_after_a_failure(tiny_model_dir, tiny_model_dir_b,
                                                                                monkeypatch):
    """rollout.sync_probe_every=3: a checksummed update whose reference the worker computes (a CPU
    trainer sends none) probes on the engine's first update, then on every third, and on the one
    after a failed update; with the reference sent (a GPU trainer) or without a checksum, on every
    update. An update that does not probe runs no engine forward, and an engine that stopped taking
    the weights in between is caught at the next probe."""
    cfg = load_config(None, ["rollout.backend=hf", "rollout.sync_probe_every=3"])
    worker = RolloutWorker(str(tiny_model_dir), cfg.rollout)
    probe_ids = [3, 4, 74, 5, 82, 6]
    state_b = load_model(tiny_model_dir_b).state_dict()
    forwards = []
    engine_logprobs = worker.engine.prompt_logprobs
    monkeypatch.setattr(worker.engine, "prompt_logprobs", lambda ids: forwards.append(1) or engine_logprobs(ids))

    def update(version: int, state=state_b, checksum: bool = True, expected=None) -> float:
        return worker.update_weights(pack_state(state), version, state_checksum(state) if checksum else None,
                                     (probe_ids, expected))["sync_probed"]
    assert [update(v) for v in range(1, 8)] == [1, 0, 0, 1, 0, 0, 1] and len(forwards) == 3
    # the engine stops taking the weights: the updates in between pass, the next probe fails ...
    monkeypatch.setattr(worker.engine, "load_weights", lambda state_dict: None)
    state_a = load_model(tiny_model_dir).state_dict()
    assert [update(8, state_a), update(9, state_a)] == [0, 0]
    with pytest.raises(WeightSyncError, match="not sampling with the new weights"):
        update(10, state_a)
    assert worker.version == 9
    monkeypatch.undo()
    # ... and the update after a failed one probes, whatever the count
    assert update(11) == 1

    def load_fails(state_dict):
        raise RuntimeError("the engine's reload failed")
    monkeypatch.setattr(worker.engine, "load_weights", load_fails)
    with pytest.raises(RuntimeError, match="reload failed"):  # an update that would not have probed
        update(12)
    monkeypatch.undo()
    assert [update(13), update(14)] == [1, 0]  # by the count alone 13 would not have probed
    assert [update(v, checksum=False) for v in (15, 16)] == [1, 1]  # no checksum: the probe is the check
    expected = probe_logprobs(load_model(tiny_model_dir_b).eval(), probe_ids)
    assert [update(v, expected=expected) for v in (17, 18)] == [1, 1]  # the reference sent (a GPU trainer's)


@pytest.mark.parametrize("tolerance, shift, passes", [(None, 0.05, False), (0.1, 0.05, True),
                                                      (None, 5e-4, True), (1e-4, 5e-4, False)])
def test_the_probe_tolerance_can_be_set(tiny_model_dir, tiny_model_dir_b, tolerance, shift, passes):
    """rollout.sync_probe_tolerance replaces the dtype's bound (1e-3 in float32), above it and
    below it; the error names the setting and the bound applied."""
    probe_ids = [3, 4, 74, 5, 82, 6]
    model_b = load_model(tiny_model_dir_b).eval()
    shifted = [lp + shift for lp in probe_logprobs(model_b, probe_ids)]
    state_b = model_b.state_dict()
    cfg = load_config(None, ["rollout.backend=hf", f"rollout.sync_probe_tolerance={tolerance or 'null'}"])
    worker = RolloutWorker(str(tiny_model_dir), cfg.rollout)
    if passes:
        metrics = worker.update_weights(pack_state(state_b), 1, state_checksum(state_b), (probe_ids, shifted))
        assert worker.version == 1 and metrics["sync_probe_diff"] == pytest.approx(shift, abs=1e-5)
    else:
        bound = "0.001" if tolerance is None else f"{tolerance:g}"
        with pytest.raises(WeightSyncError, match=rf"\(> {bound}, rollout.sync_probe_tolerance\)"):
            worker.update_weights(pack_state(state_b), 1, state_checksum(state_b), (probe_ids, shifted))
        assert worker.version == 0


def test_stop_strings_end_completions_as_in_vllm(tiny_model_dir):
    """transformers' generate pads a row that stopped on a string; the pads are not part of the
    completion (tests/rollout/test_vllm_engine.py checks vLLM the same way)."""
    from policy.models import load_tokenizer
    from rollout.engine import HFEngine
    from tests.rollout.stops import STOPS, assert_stops_end_completions
    cfg = load_config(None, ["rollout.backend=hf", "rollout.n=4", "rollout.max_tokens=12",
                             f"rollout.stop=[{','.join(repr(s) for s in STOPS)}]"]).rollout
    groups = HFEngine(str(tiny_model_dir), cfg).generate([[3, 4, 74, 5, 82], [9, 76, 5, 82]], seed=0)
    assert_stops_end_completions(groups, load_tokenizer(tiny_model_dir), max_tokens=12)


def test_the_transformers_engine_samples_what_it_logs_and_stops_at_every_end_id(tiny_model_dir, tmp_path):
    """A checkpoint's generation config may ask for a repetition penalty (Qwen2.5-Instruct: 1.05)
    or min_p, and list end-of-turn ids beside the tokenizer's EOS (Llama-3-Instruct). generate()
    would apply them to the samples while the logged behaviour logprobs are softmax(z/T): the
    first token's frequencies must follow softmax(z/T) (min_p 0.9 left a few tokens before). The
    listed end id ends a completion ("stop"), as in vLLM."""
    import json
    import shutil

    from rollout.engine import HFEngine
    from tests.rollout.speculation import chi2_pvalue
    from policy.models import load_tokenizer
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    prompt = load_tokenizer(model_dir)("1+13=", add_special_tokens=False).input_ids
    model = load_model(model_dir).eval()
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
    end_of_turn = int(probs.argmax())  # the likeliest first token, listed as an end id
    config = json.loads((model_dir / "generation_config.json").read_text())
    config.update(repetition_penalty=1.05, min_p=0.9, eos_token_id=[config["eos_token_id"], end_of_turn])
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    cfg = load_config(None, ["rollout.backend=hf", "rollout.n=2000", "rollout.max_tokens=3"]).rollout
    group = HFEngine(str(model_dir), cfg).generate([prompt], seed=0)[0]
    first = torch.bincount(torch.tensor([c.token_ids[0] for c in group]), minlength=len(probs))
    assert chi2_pvalue(first, probs) > 1e-3
    ended = [c for c in group if c.token_ids[0] == end_of_turn]
    assert ended and all(c.token_ids == [end_of_turn] and c.finish_reason == "stop" for c in ended)
