import json

import pytest

from orchestration.config import Config, ConfigError, load_config


def test_defaults_and_preset_load():
    assert isinstance(load_config(), Config)
    cfg = load_config("configs/tiny.yaml")
    assert cfg.model.name == "tiny" and cfg.rollout.backend == "vllm"


def test_preset_by_name_and_overrides():
    cfg = load_config("tiny", ["rollout.n=4", "trainer.lr=0.5", "algorithm.reward_fns=[a:b,c:d]"])
    assert cfg.rollout.n == 4 and cfg.trainer.lr == 0.5 and cfg.algorithm.reward_fns == ["a:b", "c:d"]


def test_unknown_key_names_its_path():
    with pytest.raises(ConfigError, match="rollout.temprature"):
        load_config(None, ["rollout.temprature=0.5"])


def test_wrong_type_names_its_path():
    with pytest.raises(ConfigError, match="rollout.n"):
        load_config(None, ["rollout.n=eight"])


@pytest.mark.parametrize("override, key", [
    ("rollout.n=1", "rollout.n"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("algorithm.advantage=ppo", "algorithm.advantage"),
    ("algorithm.loss_agg=sum", "algorithm.loss_agg"),
    ("model.name=huge", "model.name"),
    ("model.path=/nonexistent/dir", "model.path"),
    ("rollout.max_model_len=8", "rollout.max_model_len"),
    ("algorithm.on_reward_error=ignore", "algorithm.on_reward_error"),
    ("algorithm.behaviour_weight=always", "algorithm.behaviour_weight"),
    ("rollout.sync_probe_tolerance=0", "rollout.sync_probe_tolerance"),
    ("rollout.sync_probe_every=0", "rollout.sync_probe_every"),
    ("trainer.logit_chunk=-1", "trainer.logit_chunk"),
    ("trainer.fused_master_step=fast", "trainer.fused_master_step"),
    ("trainer.compile=fast", "trainer.compile"),
    ("rollout.spec_method=medusa", "rollout.spec_method"),
    ("mtp.head=medusa", "mtp.head"),
    ("mtp.draft_vocab=-1", "mtp.draft_vocab"),
    ("trainer.beta2=1.5", "trainer.beta2"),
    ("trainer.lr=inf", "trainer.lr"),
    ("trainer.weight_decay=-0.1", "trainer.weight_decay"),
    ("rollout.temperature=inf", "rollout.temperature"),
    ("rollout.kv_cache_gib=0", "rollout.kv_cache_gib"),
    ("rollout.gpu_memory_utilization=3", "rollout.gpu_memory_utilization"),
    ("model.warm_start_batch=0", "model.warm_start_batch"),
    ("model.warm_start_lr=-1", "model.warm_start_lr"),
])
def test_impossible_values_name_key_and_allowed(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_choice_error_lists_the_allowed_values():
    with pytest.raises(ConfigError, match=r"dr_grpo.*grpo"):
        load_config(None, ["algorithm.advantage=ppo"])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["rollout.n"])
    with pytest.raises(ConfigError, match="presets in"):
        load_config("configs/nope.yaml")


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_shipped_presets_validate(preset):
    load_config(preset)


def test_gpu_preset_demands_a_model_path(tmp_path):
    with pytest.raises(ConfigError, match="model.path"):
        load_config("qwen3_8gpu")
    with pytest.raises(ConfigError, match="data.source"):
        load_config("qwen3_8gpu", [f"model.path={tmp_path}"])
    data = tmp_path / "d.jsonl"
    data.write_text("")
    cfg = load_config("qwen3_8gpu", [f"model.path={tmp_path}", f"data.source={data}"])
    assert cfg.model.dtype == "bfloat16" and cfg.trainer.device == "cuda"


def test_native_mtp_settings_that_cannot_work_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="unset rollout.draft_model"):
        load_config(None, ["rollout.spec_method=mtp", f"rollout.draft_model={tmp_path}"])
    with pytest.raises(ConfigError, match=r"mtp\.layers.*mtp\.head=native"):
        load_config(None, ["mtp.head=native", "mtp.layers=2"])
    with pytest.raises(ConfigError, match=r"mtp\.draft_vocab.*mtp\.head=native"):
        load_config(None, ["mtp.head=native", "mtp.draft_vocab=64"])
    with pytest.raises(ConfigError, match=r"mtp\.layers.*mtp\.draft_vocab"):
        load_config(None, ["mtp.draft_vocab=64", "mtp.layers=2"])
    with pytest.raises(ConfigError, match=r"mtp\.draft_vocab=0.*mtp\.parallel=true.*EAGLE-3"):
        load_config(None, ["mtp.parallel=true"])
    with pytest.raises(ConfigError, match="native MTP layers.*stay frozen"):
        load_config(None, ["rollout.spec_method=mtp", "mtp.maintain=true"])
    (tmp_path / "config.json").write_text("{}")
    head = ["rollout.backend=vllm", f"rollout.draft_model={tmp_path}", "mtp.maintain=true"]
    with pytest.raises(ConfigError, match=r"mtp\.maintain_steps=0.*>= 1 with mtp\.maintain=true"):
        load_config(None, head + ["mtp.maintain_steps=0"])
    with pytest.raises(ConfigError, match=r"mtp\.maintain_lr=0\.0.*finite, > 0"):
        load_config(None, head + ["mtp.maintain_lr=0"])
    assert load_config(None, head).mtp.maintain_steps == 1
    cfg = load_config(None, ["rollout.spec_method=mtp", "rollout.adaptive_spec=true", "model.name=tiny_mimo"])
    assert cfg.rollout.spec_method == "mtp" and cfg.model.name == "tiny_mimo"


STATE = '{"step": 5, "version": 5, "submitted": 5, "regenerated": 0, "stream": {}, "in_flight": []}'


def test_resume_needs_more_steps_than_the_checkpoint_has(tmp_path):
    (tmp_path / "loop_state.json").write_text(STATE)
    with pytest.raises(ConfigError, match=r"orchestration\.steps=5: must be > 5"):
        load_config(None, [f"orchestration.resume={tmp_path}", "orchestration.steps=5"])
    assert load_config(None, [f"orchestration.resume={tmp_path}", "orchestration.steps=6"]).orchestration.steps == 6
    with pytest.raises(ConfigError, match="not an rlaccel checkpoint"):
        load_config(None, [f"orchestration.resume={tmp_path / 'nope'}"])


def test_a_resume_with_another_trainer_layout_is_refused_when_the_config_is_loaded(tmp_path):
    """Before any warm start: DeepSpeed's optimizer files of two ranks do not load into one."""
    from orchestration.checkpoint import setup_identity
    setup = setup_identity(load_config(None, ["trainer.world_size=2"]))
    (tmp_path / "loop_state.json").write_text(STATE[:-1] + f', "setup": {json.dumps(setup)}}}')
    with pytest.raises(ConfigError, match=r"trainer\.world_size=1 differs from the checkpoint's 2"):
        load_config(None, [f"orchestration.resume={tmp_path}", "orchestration.steps=6"])
    load_config(None, [f"orchestration.resume={tmp_path}", "orchestration.steps=6", "trainer.world_size=2"])


def test_bad_yaml_and_bad_layers_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'rollout.stop=\[a': not valid YAML"):
        load_config(None, ["rollout.stop=[a"])
    (tmp_path / "broken.yaml").write_text("model: [\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(str(tmp_path / "broken.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml: a preset is a mapping"):
        load_config(str(tmp_path / "list.yaml"))
    # the error names the override it is in, not the last one given
    with pytest.raises(ConfigError, match=r"override 'orchestration.stepz=1'.*Did you mean"):
        load_config(None, ["orchestration.stepz=1", "orchestration.steps=5"])
    with pytest.raises(ConfigError, match=r"in brackets: key=\[a,b\]"):
        load_config(None, ["algorithm.reward_fns=a:f"])


@pytest.mark.parametrize("text, named", [("", "readable JSON"), ('{"step": 5', "readable JSON"), ("[]", "step"),
                                         ('{"step": 5}', "version")])
def test_a_damaged_loop_state_is_named_with_the_way_out(tmp_path, text, named):
    (tmp_path / "loop_state.json").write_text(text)
    with pytest.raises(ConfigError, match=f"loop_state.json is damaged.*{named}.*model.path="):
        load_config(None, [f"orchestration.resume={tmp_path}", "orchestration.steps=6"])


def test_an_earlier_run_in_the_directory_is_kept_unless_resumed_or_overwritten(tmp_path):
    """Nothing of an earlier run in logging.dir is lost: a new run logs beside it (<dir>-2, -3, ...),
    a resume of its checkpoint goes on with it there, logging.overwrite=true deletes its files."""
    from orchestration.checkpoint import claim_run_dir
    run = tmp_path / "run"
    assert claim_run_dir(run, None, False) == run  # a new directory
    run.mkdir()
    (run / "config.yaml").write_text("x")  # written before anything else: not a run yet
    assert claim_run_dir(run, None, False) == run
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    (run / "trajectories.from-step3.parquet").write_text("x")
    (run / "checkpoint").mkdir()
    (run / "checkpoint" / "loop_state.json").write_text(STATE)
    assert claim_run_dir(run, None, False) == tmp_path / "run-2"  # created: claimed by this run
    assert claim_run_dir(run, None, False) == tmp_path / "run-3"  # a run starting beside it takes the next
    assert claim_run_dir(run, str(run / "checkpoint"), False) == run  # resumed in place
    (tmp_path / "run-2" / "checkpoint").mkdir()
    assert claim_run_dir(run, str(tmp_path / "run-2" / "checkpoint"), False) == tmp_path / "run-2"  # where it went
    assert claim_run_dir(run, str(tmp_path / "other" / "checkpoint"), False) == tmp_path / "run-4"
    with pytest.raises(ConfigError, match="would delete the checkpoint"):
        claim_run_dir(run, str(run / "checkpoint"), True)
    assert (run / "metrics.jsonl").is_file()  # nothing deleted but by overwrite
    assert claim_run_dir(run, None, True) == run
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_lengths_beyond_the_model_and_non_finite_coefficients_are_refused_at_load(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout.max_model_len=4096: must be <= the model's max_position_embeddings=512"):
        load_config("tiny", ["rollout.max_model_len=4096", "data.max_prompt_tokens=4000"])
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 256}')
    with pytest.raises(ConfigError, match="max_position_embeddings=256"):
        load_config("tiny", [f"model.path={tmp_path}", "rollout.max_model_len=300"])
    for override in ("algorithm.kl_coef=inf", "algorithm.clip_high=nan", "algorithm.is_cap=inf"):
        with pytest.raises(ConfigError, match=f"{override.split('=')[0]}=.*finite"):
            load_config("tiny", [override])


class _SavingTrainer:
    """A trainer group's save as far as checkpoint.save calls it: the weights' file, marked."""

    def __init__(self, mark: str):
        self.mark = mark

    def save(self, directory: str, timeout=None) -> None:
        from pathlib import Path
        Path(directory).mkdir(parents=True)
        (Path(directory) / "weights").write_text(self.mark)


def test_a_crash_while_a_checkpoint_is_replaced_leaves_a_complete_one_to_resume_from(tmp_path, monkeypatch):
    """The old copy is moved aside, not deleted, until the new one is in place: a crash between
    the two renames leaves the new complete copy (.tmp) and the old (.old); the next save replaces
    both, and a run resuming from the name first puts the new copy in its place."""
    from pathlib import Path

    from orchestration import checkpoint
    ckpt = tmp_path / "checkpoint"
    checkpoint.save(ckpt, _SavingTrainer("v1"), json.loads(STATE))
    assert (ckpt / "weights").read_text() == "v1" and not list(tmp_path.glob("checkpoint.*"))
    rename = Path.rename

    def crash_at_the_swap(self, target):
        if self.name == "checkpoint.tmp":
            raise KeyboardInterrupt("killed")
        return rename(self, target)
    monkeypatch.setattr(Path, "rename", crash_at_the_swap)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(ckpt, _SavingTrainer("v2"), json.loads(STATE))
    monkeypatch.setattr(Path, "rename", rename)
    assert not ckpt.exists() and (tmp_path / "checkpoint.old" / "weights").read_text() == "v1"
    assert (tmp_path / "checkpoint.tmp" / "weights").read_text() == "v2"
    checkpoint.save(ckpt, _SavingTrainer("v3"), json.loads(STATE))  # the next save replaces both
    assert (ckpt / "weights").read_text() == "v3" and not list(tmp_path.glob("checkpoint.*"))
    monkeypatch.setattr(Path, "rename", crash_at_the_swap)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(ckpt, _SavingTrainer("v4"), json.loads(STATE))
    monkeypatch.setattr(Path, "rename", rename)
    # validating a resume from the name reads the complete copy and changes nothing (a run may be
    # mid-save); the resuming run finishes the swap: the new complete copy, under the name
    assert load_config(None, [f"orchestration.resume={ckpt}", "orchestration.steps=6"]).orchestration.steps == 6
    assert not ckpt.exists() and (tmp_path / "checkpoint.tmp" / "weights").read_text() == "v4"
    checkpoint.finish_swap(ckpt)
    assert (ckpt / "weights").read_text() == "v4" and not list(tmp_path.glob("checkpoint.*"))


def test_a_resume_drafts_with_the_checkpoint_s_head_only_if_it_maintains_it(tmp_path, caplog):
    """A checkpoint's maintained head (``drafter/``) replaces rollout.draft_model only when the
    resumed run maintains it too; a resume with the drafter off or frozen gets what it asks for."""
    from orchestration.grpo import resumed_draft_model
    ckpt = tmp_path / "checkpoint"
    (ckpt / "drafter").mkdir(parents=True)
    (ckpt / "loop_state.json").write_text(STATE)
    resume = [f"orchestration.resume={ckpt}", "orchestration.steps=6"]
    cfg = Config()
    cfg.orchestration.resume, cfg.orchestration.steps = str(ckpt), 6
    cfg.rollout.draft_model, cfg.mtp.maintain = str(tmp_path / "head"), True
    assert resumed_draft_model(cfg) == str(ckpt / "drafter")
    cfg.mtp.maintain = False
    assert resumed_draft_model(cfg) == str(tmp_path / "head")
    assert "is not used (mtp.maintain=false)" in caplog.text
    cfg.rollout.draft_model = None  # speculation off
    assert resumed_draft_model(cfg) is None
    assert resumed_draft_model(load_config(None, resume)) is None  # the default config: no drafter
    cfg.orchestration.resume = None
    cfg.rollout.draft_model = str(tmp_path / "head")
    assert resumed_draft_model(cfg) == str(tmp_path / "head")


def test_a_drafter_verified_against_another_target_than_its_training_is_warned_about(tmp_path, caplog):
    (tmp_path / "config.json").write_text("{}")
    head = f"rollout.draft_model={tmp_path}"
    load_config(None, [head, "rollout.top_p=0.9"])
    assert "rollout.top_p=0.9 with a drafter" in caplog.text
    load_config(None, [head, "rollout.draft_sample_method=greedy"])  # a head trained elsewhere: no guess
    assert "draft_sample_method=greedy" not in caplog.text
    load_config(None, [head, "rollout.draft_sample_method=greedy", "mtp.maintain=true"])
    assert "draft_sample_method=greedy with mtp.maintain and mtp.objective=tv" in caplog.text
    caplog.clear()
    load_config(None, ["rollout.top_p=0.9"])  # no drafter: no drafter warning, the truncation's own
    assert "truncated distribution" in caplog.text and "top_p=1 keeps them exact" in caplog.text
    assert "does not (weight 1, algorithm.behaviour_weight=auto)" in caplog.text  # float32: auto is stale
    caplog.clear()
    load_config(None, ["rollout.top_p=0.9", "algorithm.behaviour_weight=all"])  # a fresh sample is weighted too
    assert "gets it too (algorithm.behaviour_weight=all)" in caplog.text and "scales the update down" in caplog.text
    caplog.clear()
    load_config(None, [head])
    assert "with a drafter" not in caplog.text and "greedy" not in caplog.text and "truncated" not in caplog.text


def test_a_reward_function_listed_twice_a_bad_device_or_schedule_is_refused():
    with pytest.raises(ConfigError, match=r"algorithm.reward_fns=.*each function once"):
        load_config(None, ["algorithm.reward_fns=[rollout.rewards:arithmetic_reward,rollout.rewards:arithmetic_reward]"])
    for device in ("gpu", "cuda:1"):  # a rank sees its own GPU only, as cuda:0
        with pytest.raises(ConfigError, match=r"trainer.device='%s'.*'cpu' or 'cuda'" % device):
            load_config(None, [f"trainer.device={device}"])
    assert load_config(None, ["trainer.device=cuda:0"]).trainer.device == "cuda:0"
    with pytest.raises(ConfigError, match=r"rollout.gpus=2.*no tensor parallelism.*rollout.num_workers"):
        load_config(None, ["rollout.gpus=2"])
    with pytest.raises(ConfigError, match="attention_backend=flex needs trainer.device=cuda.*regions"):
        load_config(None, ["trainer.attention_backend=flex", "trainer.shared_prompt=true"])
    assert load_config(None, ["trainer.attention_backend=flex", "trainer.shared_prompt=true",
                              "trainer.device=cuda"]).trainer.attention_backend == "flex"
    for bad in ("[[1,8]]", "[[1,8,4]]", "[[8,1,2]]", "[]"):
        with pytest.raises(ConfigError, match=r"rollout.spec_schedule=.*rows \[lo, hi, k\]"):
            load_config(None, [f"rollout.spec_schedule={bad}"])
    assert load_config(None, ["rollout.spec_schedule=[[1,8,3],[9,256,0]]"]).rollout.spec_schedule == [[1, 8, 3],
                                                                                                       [9, 256, 0]]


def test_main_checks_a_config_changed_after_loading(tmp_path):
    from orchestration.grpo import main
    config = load_config(None, [f"logging.dir={tmp_path}"])
    config.algorithm.on_reward_error = "skip"  # not a choice: it would have acted as "zero"
    with pytest.raises(ConfigError, match=r"algorithm.on_reward_error='skip'"):
        main(config, progress=False)
