"""The trainer actor exports on its own thread while the next step runs (orchestration.trainer_actor):
an export must copy the weights of the steps submitted before it, and a step must not write the
weights while an export submitted before it still reads them. Run in this process, the actor's two
threads as two threads here, with a stand-in trainer whose step writes its one weight in place and
an object store whose copy can be held open (``ray.put``)."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from orchestration import trainer_actor
from orchestration.trainer_actor import TrainerActor
from policy.models import state_checksum, unpack_state

WAIT = 5.0  # seconds a thread may take to reach its turn; far above what it needs


class _Trainer:
    """PolicyTrainer's surface that TrainerActor uses: a step writes the weights in place, after
    ``before_write`` (where the actor waits for its exports)."""

    def __init__(self):
        self.cfg = SimpleNamespace(device="cpu")
        self.weight, self.version, self.fail = torch.zeros(1024), 0, False
        self.before_write = lambda: None

    def state_dict(self, copy: bool = True) -> dict:
        return {"w": self.weight.detach().clone() if copy else self.weight.detach()}

    def step(self, groups, mini_batch) -> dict:
        if self.fail:
            raise FloatingPointError("refused")
        self.before_write()
        self.weight += 1.0
        self.version += 1
        return {"update_s": 0.0}


class _Store:
    """ray.put's stand-in: copies the packed arrays, once ``opened`` is set (``entered`` says a copy began)."""

    def __init__(self):
        self.entered, self.opened, self.fail = threading.Event(), threading.Event(), False
        self.opened.set()

    def put(self, packed: dict):
        self.entered.set()
        assert self.opened.wait(WAIT)
        if self.fail:
            raise MemoryError("object store full")
        return {k: (a.copy(), dtype, shape) for k, (a, dtype, shape) in packed.items()}


@pytest.fixture()
def actor(monkeypatch):
    store = _Store()
    monkeypatch.setattr(trainer_actor.ray, "put", store.put)
    a = TrainerActor()
    a.trainer, a.maintainer, a.probe_ids = _Trainer(), None, [1, 2]
    a.store = store
    return a


def _start(fn, *args) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except Exception as exc:  # noqa: BLE001 (the test reads it)
            out["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _exported(result) -> tuple[dict, int, str]:
    weights, version, checksum, probe = result
    assert probe == ([1, 2], None)  # a CPU trainer: the worker computes the reference logprobs
    return unpack_state(weights), version, checksum


def test_a_step_writes_only_after_the_export_before_it_has_copied(actor):
    actor.step([], None, 0)
    actor.store.opened.clear()  # the export's copy is held open
    export, exported = _start(actor.export, 1)
    assert actor.store.entered.wait(WAIT)
    step, stepped = _start(actor.step, [], None, 1)
    time.sleep(0.3)
    assert step.is_alive() and float(actor.trainer.weight[0]) == 1.0  # waiting to write
    actor.store.opened.set()
    export.join(WAIT)
    step.join(WAIT)
    assert not export.is_alive() and not step.is_alive() and "error" not in stepped
    weights, version, checksum = _exported(exported["value"])
    assert version == 1 and torch.equal(weights["w"], torch.ones(1024)) and checksum == state_checksum(weights)
    assert float(actor.trainer.weight[0]) == 2.0 and actor.trainer.version == 2


def test_an_export_waits_for_the_steps_submitted_before_it(actor):
    export, exported = _start(actor.export, 2)  # after two steps, neither run yet
    time.sleep(0.3)
    assert export.is_alive() and not actor.store.entered.is_set()
    actor.step([], None, 0)
    time.sleep(0.3)
    assert export.is_alive()
    actor.step([], None, 0)
    export.join(WAIT)
    weights, version, _ = _exported(exported["value"])
    assert version == 2 and torch.equal(weights["w"], torch.full((1024,), 2.0))


def test_a_failed_step_or_export_holds_up_nothing(actor):
    actor.trainer.fail = True
    with pytest.raises(FloatingPointError):
        actor.step([], None, 0)
    actor.trainer.fail = False
    export, exported = _start(actor.export, 1)  # after the failed step: the weights as they are
    export.join(WAIT)
    weights, version, _ = _exported(exported["value"])
    assert version == 0 and torch.equal(weights["w"], torch.zeros(1024))
    actor.store.fail = True
    export, exported = _start(actor.export, 1)
    export.join(WAIT)
    assert isinstance(exported.get("error"), MemoryError)
    step, stepped = _start(actor.step, [], None, 2)  # after both exports, the failed one too
    step.join(WAIT)
    assert not step.is_alive() and stepped["value"] == {"update_s": 0.0} and actor.trainer.version == 1


def test_a_new_run_counts_from_zero(actor, tiny_model_dir):
    """setup() (a kept actor's next run: orchestration.actors.Actors) resets the counts, as its new
    TrainerGroup numbers from zero: a step of the new run does not wait for exports of the old."""
    actor.step([], None, 0)
    actor.export(1)
    assert (actor._steps_done, actor._exports_done) == (1, 1)
    from orchestration.config import load_config
    cfg = load_config(None, [])
    actor.setup(str(tiny_model_dir), cfg.trainer, cfg.algorithm, 1.0, 8, "float32", [1, 2])
    assert (actor._steps_done, actor._exports_done) == (0, 0)
