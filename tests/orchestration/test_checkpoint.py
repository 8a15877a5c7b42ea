"""Checkpoint files without Ray: what a save may replace, what a resume refuses, which
checkpoints a resume from an earlier step sets aside, and the trainer actor's part of a resume."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestration import checkpoint
from orchestration.config import ConfigError


class FakeTrainer:
    """Writes a weights file, or raises ``fail`` from its save."""

    def __init__(self, fail: BaseException | None = None):
        self.fail = fail

    def save(self, directory: str, timeout=None) -> str:
        if self.fail is not None:
            raise self.fail
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "model.safetensors").write_bytes(b"weights")
        return directory


def _resumable(directory: Path, step: int) -> Path:
    directory.mkdir(parents=True)
    (directory / checkpoint.STATE_FILE).write_text(json.dumps({"step": step}))
    return directory


def test_weights_only_never_replace_a_checkpoint_a_run_resumes_from(tmp_path):
    ckpt = checkpoint.save(tmp_path / "checkpoint-interrupted", FakeTrainer(), {"step": 3})
    with pytest.raises(ValueError, match="resume from: weights only go elsewhere"):
        checkpoint.save(ckpt, FakeTrainer(), None)
    assert json.loads((ckpt / checkpoint.STATE_FILE).read_text()) == {"step": 3}
    weights = checkpoint.save(tmp_path / checkpoint.WEIGHTS_ONLY, FakeTrainer(), None)
    assert (weights / "model.safetensors").is_file() and not (weights / checkpoint.STATE_FILE).exists()
    # a later run beside it in the same logging.dir sees an earlier run's files, weights-only ones too
    assert checkpoint.claim_run_dir(tmp_path, None, False) == tmp_path.with_name(tmp_path.name + "-2")


def test_a_save_stopped_by_ctrl_c_keeps_the_checkpoint_it_would_replace(tmp_path, caplog):
    from orchestration.grpo import _try_save
    ckpt = checkpoint.save(tmp_path / "checkpoint-interrupted", FakeTrainer(), {"step": 3})
    assert _try_save(FakeTrainer(fail=KeyboardInterrupt()), ckpt, {"step": 5}) is None
    assert json.loads((ckpt / checkpoint.STATE_FILE).read_text()) == {"step": 3}
    assert _try_save(FakeTrainer(), ckpt, {"step": 5}) == str(ckpt)
    assert json.loads((ckpt / checkpoint.STATE_FILE).read_text()) == {"step": 5}


def test_a_resume_from_an_earlier_step_sets_the_later_checkpoints_aside(tmp_path):
    run = tmp_path / "run"
    final, stopped = _resumable(run / "checkpoint", 8), _resumable(run / "checkpoint-interrupted", 1)
    step2, step4, step6 = (_resumable(run / "checkpoints" / f"step-{s}", s) for s in (2, 4, 6))
    weights = run / checkpoint.WEIGHTS_ONLY
    weights.mkdir()
    moved = checkpoint.set_aside_later(run, 4, step4)
    assert sorted(moved) == sorted([run / "checkpoint.abandoned", run / "checkpoints" / "step-6.abandoned"])
    assert not final.exists() and not step6.exists()
    assert stopped.is_dir() and step2.is_dir() and step4.is_dir() and weights.is_dir()  # earlier, resumed, no step
    assert json.loads((run / "checkpoint.abandoned" / checkpoint.STATE_FILE).read_text()) == {"step": 8}
    _resumable(run / "checkpoint", 7)  # the next branch's end, then a resume from step 2
    assert checkpoint.set_aside_later(run, 2, step2) == [run / "checkpoint.abandoned-2",
                                                         run / "checkpoints" / "step-4.abandoned"]
    assert checkpoint.set_aside_later(run, 2, step2) == []  # set-aside copies are not set aside again


def _config(world_size=1, zero_stage=1, path=None, kl=0.0, spec="eagle"):
    return SimpleNamespace(trainer=SimpleNamespace(world_size=world_size, zero_stage=zero_stage),
                           model=SimpleNamespace(path=path, name="tiny", warm_start_steps=800) if path is None else
                           SimpleNamespace(path=path), algorithm=SimpleNamespace(kl_coef=kl),
                           rollout=SimpleNamespace(spec_method=spec))


def test_a_resume_refuses_another_trainer_layout_and_another_model_where_it_is_read(tmp_path, caplog, monkeypatch):
    import dataclasses
    monkeypatch.setattr(dataclasses, "asdict", vars)  # the SimpleNamespace configs above
    for name, text in (("a", '{"hidden_size": 8}'), ("b", '{"hidden_size": 16}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
    (tmp_path / "mount").symlink_to(tmp_path / "a")  # the same model under another path: the same
    same = _config(world_size=2, path=str(tmp_path / "mount"), kl=0.1)
    saved = {"setup": checkpoint.setup_identity(_config(world_size=2, path=str(tmp_path / "a")))}
    checkpoint.check_setup(saved, checkpoint.setup_identity(same), same, "ckpt")
    for config, setting in ((_config(world_size=1, path=str(tmp_path / "a")), "trainer.world_size=1 differs"),
                            (_config(world_size=2, zero_stage=2, path=str(tmp_path / "a")),
                             "trainer.zero_stage=2 differs")):
        with pytest.raises(ConfigError, match=f"{setting} from the checkpoint's .*resume with"):
            checkpoint.check_setup(saved, checkpoint.setup_identity(config), config, "ckpt")
    other = _config(world_size=2, path=str(tmp_path / "b"))
    with caplog.at_level(logging.WARNING, logger="rlaccel"):
        checkpoint.check_setup(saved, checkpoint.setup_identity(other), other, "ckpt")  # no KL: read nowhere
    assert "the model differs" in caplog.text and "goes on" in caplog.text
    for used in (_config(world_size=2, path=str(tmp_path / "b"), kl=0.1),
                 _config(world_size=2, path=str(tmp_path / "b"), spec="mtp")):
        with pytest.raises(ConfigError, match="the model differs.*resume with the run's model settings"):
            checkpoint.check_setup(saved, checkpoint.setup_identity(used), used, "ckpt")
    built_in = _config()
    changed = _config()
    changed.model.warm_start_steps = 100
    assert checkpoint.setup_identity(built_in) != checkpoint.setup_identity(changed)
    checkpoint.check_setup({}, checkpoint.setup_identity(other), other, "ckpt")  # an older checkpoint: no record


class _Recorder:
    def __init__(self, metrics=None):
        self.loaded, self.metrics, self.version, self.model = [], metrics or {}, 3, None

    def load(self, directory):
        self.loaded.append(directory)

    load_checkpoint = load

    def step(self, *args):
        return dict(self.metrics)


def test_the_trainer_actor_counts_head_maintenance_and_starts_it_where_a_checkpoint_has_none(tmp_path):
    from mtp.maintain import HEAD_DIR
    from orchestration.trainer_actor import TrainerActor
    actor = TrainerActor()
    actor.trainer, actor.maintainer = _Recorder({"update_s": 1.0}), _Recorder({"head_maintain_s": 0.25})
    assert actor.step([])["update_s"] == 1.25
    assert actor.load(str(tmp_path)) == 3 and actor.maintainer.loaded == []  # no maintained head saved
    (tmp_path / HEAD_DIR).mkdir()
    actor.load(str(tmp_path))
    assert actor.maintainer.loaded == [tmp_path]


def test_only_the_newest_periodic_checkpoints_are_kept(tmp_path):
    run = tmp_path / "run"
    for s in (2, 4, 6, 10):
        _resumable(run / "checkpoints" / f"step-{s}", s)
    aside = _resumable(run / "checkpoints" / "step-8.abandoned", 8)  # not a periodic one of this branch
    assert checkpoint.prune(run, 0) == [] and len(checkpoint.periodic(run)) == 4  # 0 keeps all
    # the checkpoint the run resumed from stays (its workers start from it, and Ray restarts them from it)
    assert checkpoint.prune(run, 2, resumed=str(run / "checkpoints" / "step-2")) == [run / "checkpoints" / "step-4"]
    assert checkpoint.periodic(run) == [run / "checkpoints" / f"step-{s}" for s in (2, 6, 10)]
    assert checkpoint.prune(run, 2) == [run / "checkpoints" / "step-2"]
    assert checkpoint.periodic(run) == [run / "checkpoints" / "step-6", run / "checkpoints" / "step-10"]
    assert aside.is_dir()
