"""The rollout worker on the transformers engine (fast; the vLLM engine has its own tests)."""

import pytest
import torch

from orchestration.config import load_config
from policy.batch import pad_sequences
from policy.models import load_model, pack_state, state_checksum
from policy.trainer import token_logprobs
from rollout.worker import RolloutWorker, WeightSyncError

ROWS = [(0, {"prompt": "12+7=", "answer": "19"}), (1, {"prompt": "3-5=", "answer": "-2"})]


@pytest.fixture()
def worker(tiny_model_dir):
    cfg = load_config(None, ["rollout.backend=hf", "rollout.n=3", "rollout.max_tokens=5", "rollout.temperature=0.8"])
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
    assert worker.version == 0


def test_update_is_verified_by_the_probe(worker, tiny_model_dir, tiny_model_dir_b):
    probe_ids = [3, 4, 74, 5, 82, 6]
    model_b = load_model(tiny_model_dir_b).eval()
    state_b = model_b.state_dict()
    with torch.no_grad():
        logits = model_b(torch.tensor([probe_ids])).logits[0, :-1]
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(probe_ids[1:])[:, None])[:, 0].tolist()
    metrics = worker.update_weights(pack_state(state_b), 1, state_checksum(state_b), (probe_ids, expected))
    assert worker.version == 1 and metrics["sync_probe_diff"] < 1e-5
    # A probe computed with other weights than the ones delivered must be caught.
    state_a = load_model(tiny_model_dir).state_dict()
    with pytest.raises(WeightSyncError, match="not sampling with the new weights"):
        worker.update_weights(pack_state(state_a), 2, state_checksum(state_a), (probe_ids, expected))
    assert worker.version == 1
    # ... and the worker refuses to sample with unverified weights until a verified update
    with pytest.raises(WeightSyncError, match="refusing to sample"):
        worker.generate(ROWS, seed=0)
    worker.update_weights(pack_state(state_b), 3, state_checksum(state_b), (probe_ids, expected))
    assert worker.version == 3 and worker.generate(ROWS, seed=0)[0][0].version == 3
