"""The built-in model cache: one build per key, even when two processes want it at once."""

import threading

from filelock import FileLock

from orchestration import model_prep
from orchestration.config import load_config


def test_a_second_caller_waits_for_the_build_in_progress_and_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RLACCEL_CACHE", str(tmp_path))
    config = load_config("tiny", ["model.warm_start_steps=0"])
    key_src, target = model_prep.cached_model(config)
    builds = []
    build = model_prep._build
    monkeypatch.setattr(model_prep, "_build", lambda *args: builds.append(args[2]) or build(*args))
    found: dict = {}
    with FileLock(str(target) + ".lock"):  # another process is building this model
        waiter = threading.Thread(target=lambda: found.update(path=model_prep.prepare_model(config, progress=False)))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive(), "prepare_model did not wait for the build in progress"
        build(config, key_src, target, False)  # the other process's build finishes
    waiter.join(timeout=30)
    assert found["path"] == target and builds == [], "the waiting caller built the model again"
    assert model_prep.prepare_model(config, progress=False) == target and builds == []


def test_a_new_key_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("RLACCEL_CACHE", str(tmp_path))
    config = load_config("tiny", ["model.warm_start_steps=0"])
    builds = []
    build = model_prep._build
    monkeypatch.setattr(model_prep, "_build", lambda *args: builds.append(args[2]) or build(*args))
    first = model_prep.prepare_model(config, progress=False)
    assert (first / "config.json").is_file() and builds == [first]
    assert model_prep.prepare_model(config, progress=False) == first and builds == [first]
    # The seed draws the initial weights and the warm start's batches: another seed, another model
    # (a cache shared by runs of several seeds once returned the first seed's model to all).
    config.orchestration.seed = 1
    second = model_prep.prepare_model(config, progress=False)
    assert second != first and builds == [first, second]
    config.model.warm_start_steps = 1
    third = model_prep.prepare_model(config, progress=False)
    assert third not in (first, second) and builds == [first, second, third]


def test_label_smoothing_spares_the_padded_vocabulary():
    """The warm start's smoothing target is (1 - eps) one-hot + eps uniform over the ids the tokenizer
    produces (float64 against the explicit target distribution); torch's label_smoothing where no
    vocabulary is padded."""
    import torch

    from policy.warm_start import smoothed_cross_entropy
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 5, 10, dtype=torch.float64), torch.randint(0, 7, (3, 5))
    target = torch.zeros(3, 5, 10, dtype=torch.float64)
    target[..., :7] = 0.2 / 7
    target.scatter_add_(-1, targets[..., None], torch.full((3, 5, 1), 0.8, dtype=torch.float64))
    explicit = -(target * torch.log_softmax(logits, -1)).sum(-1)
    assert torch.allclose(smoothed_cross_entropy(logits, targets, 0.2, 7), explicit, atol=1e-12, rtol=0)
    torchs = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none", label_smoothing=0.2)
    assert torch.equal(smoothed_cross_entropy(logits, targets, 0.2, 10), torchs)


def test_an_edited_data_file_names_another_model(tmp_path):
    """The key holds the data file's size and modification time, not only its path: a model
    warm-started on the old prompts is not reused for the new ones."""
    import json
    import os
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    config = load_config("tiny", [f"data.source={data}"])
    _, first = model_prep.cached_model(config)
    assert model_prep.cached_model(config)[1] == first
    data.write_text(json.dumps({"prompt": "2+2=", "answer": "4"}) + "\n")  # same size
    os.utime(data, ns=(1, 1))  # an edit another second
    assert model_prep.cached_model(config)[1] != first
