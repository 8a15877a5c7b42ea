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
