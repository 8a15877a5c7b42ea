"""trainer.compile (policy/compiled.py): compiled decoder layers train as the eager ones do, and
the rule that picks them."""

import logging

import pytest
import torch

from orchestration.config import load_config
from policy import compiled
from policy.compiled import compile_layers, decoder_layers
from policy.models import load_model
from policy.trainer import PolicyTrainer
from tests.policy.test_packed import exact_float64_norms  # noqa: F401 (autouse: float64 norms in float64)
from tests.policy.test_trainer import _assert_same_update, _groups


def _trainer(model_dir, *overrides, dtype="float64"):
    cfg = load_config(None, ["trainer.lr=1e-2", "trainer.micro_batch_size=3", *overrides])
    return PolicyTrainer(model_dir, cfg.trainer, cfg.algorithm, temperature=1.0, max_tokens=8, dtype=dtype)


def _batches():
    """Two steps of groups with their own prompts: micro-batches of other shapes in each."""
    first = _groups([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.5, 0.0]])
    second = _groups([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.5, 0.0, 1.0, 0.0]])
    for g, group in enumerate(first + second):
        group.prompt_ids = [3, 70 + g, 3] + [82] * (g % 3 + 1)
    return first, second


@pytest.mark.slow
@pytest.mark.parametrize("shared", [False, True], ids=["unpacked", "packed"])
def test_compiled_layers_train_as_the_eager_ones_in_float64(tiny_model_dir, shared):
    """Two float64 steps with compiled layers and with eager ones: the same gradients and weights up
    to rounding (the same math; fused loops only regroup it), and the compiled graphs did run."""
    grads, weights = {}, {}
    for mode in ("on", "off"):
        t = _trainer(tiny_model_dir, f"trainer.shared_prompt={shared}", f"trainer.compile={mode}")
        assert t.compiled_layers == (len(decoder_layers(t.model)) if mode == "on" else 0)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for groups in _batches():
            t.step(groups)
        ran = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        assert (ran > 0) == (mode == "on")  # new graphs only where the layers are compiled (this test's shapes)
        grads[mode] = {n: p.grad.clone() for n, p in t.model.named_parameters()}
        weights[mode] = {k: v.clone() for k, v in t.model.state_dict().items()}
    assert max(float(g.abs().max()) for g in grads["off"].values()) > 0
    _assert_same_update(grads["on"], grads["off"])
    _assert_same_update(weights["on"], weights["off"])


@pytest.mark.slow
def test_compiled_bfloat16_layers_are_as_accurate_as_eager_ones(tiny_model_dir):
    """In bfloat16 the compiled layers round differently (their fused loops keep float32
    intermediates): the packed logprobs and weight gradients of a bfloat16 model, compiled and
    eager, are each compared with the float64 model's; the compiled error is at most twice the
    eager one's (it is usually smaller)."""
    groups, _ = _batches()
    prompts = [g.prompt_ids for g in groups for _ in range(g.n)]
    responses = [r for g in groups for r in g.responses]
    idx = list(range(len(responses)))
    results = {}
    for name, dtype, mode in (("oracle", "float64", "off"), ("eager", "bfloat16", "off"), ("compiled", "bfloat16", "on")):
        t = _trainer(tiny_model_dir, "trainer.shared_prompt=true", f"trainer.compile={mode}", dtype=dtype)
        logp, mask = t._logprobs(t.model, prompts, responses, idx)
        (logp * mask).sum().backward()
        results[name] = (logp.detach().double(), {n: p.grad.double() for n, p in t.model.named_parameters()})
    oracle_logp, oracle_grads = results.pop("oracle")
    error = {name: ((logp - oracle_logp).abs().max(),
                    max(float((g - oracle_grads[n]).norm() / oracle_grads[n].norm().clamp_min(1e-30)) for n, g in grads.items()))
             for name, (logp, grads) in results.items()}
    assert error["eager"][0] > 0 and error["eager"][1] > 0  # bfloat16 rounds: the bound below is not vacuous
    assert error["compiled"][0] <= 2 * error["eager"][0], error
    assert error["compiled"][1] <= 2 * error["eager"][1], error


def test_auto_compiles_only_large_models_on_one_cpu_rank(tiny_model_dir, monkeypatch):
    model = load_model(tiny_model_dir, torch.float32)
    layers = len(decoder_layers(model))
    assert layers == model.config.num_hidden_layers
    assert compile_layers(model, "auto", "cpu", 1, False) == 0  # ~1M parameters: below the threshold
    monkeypatch.setattr(compiled, "AUTO_MIN_PARAMETERS", 0)
    for device, world_size, checkpointing in (("cuda", 1, False), ("cpu", 2, False), ("cpu", 1, True)):
        assert compile_layers(model, "auto", device, world_size, checkpointing) == 0
    assert compile_layers(model, "off", "cpu", 1, False) == 0
    assert all(m._compiled_call_impl is None for m in decoder_layers(model))
    assert compile_layers(model, "auto", "cpu", 1, False) == layers
    assert all(m._compiled_call_impl is not None for m in decoder_layers(model))


def test_a_failed_compile_falls_back_under_auto_and_raises_under_on(tiny_model_dir, monkeypatch, caplog):
    model = load_model(tiny_model_dir, torch.float32)
    monkeypatch.setattr(compiled, "AUTO_MIN_PARAMETERS", 0)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")
    monkeypatch.setattr(compiled.torch, "compile", no_compiler)
    with caplog.at_level(logging.WARNING, logger="policy.compiled"):
        assert compile_layers(model, "auto", "cpu", 1, False) == 0
    assert "layers stay eager" in caplog.text and "no C++ compiler found" in caplog.text
    with pytest.raises(RuntimeError, match="trainer.compile=on: compiling failed.*trainer.compile=off"):
        compile_layers(model, "on", "cpu", 1, False)
    assert all(m._compiled_call_impl is None for m in decoder_layers(model))


def test_on_refuses_what_it_cannot_compile(tiny_model_dir):
    model = load_model(tiny_model_dir, torch.float32)
    with pytest.raises(ValueError, match="gradient_checkpointing.*trainer.compile=off"):
        compile_layers(model, "on", "cpu", 1, True)
    with pytest.raises(ValueError, match="nothing to compile"):
        compile_layers(torch.nn.Linear(2, 2), "on", "cpu", 1, False)
    with pytest.raises(ValueError, match="choose one of"):
        compile_layers(model, "yes", "cpu", 1, False)


@pytest.mark.parametrize("key", ["trainer.compile", "trainer.fused_master_step"])
def test_on_and_off_overrides_are_the_modes_not_booleans(key):
    """YAML reads a bare on / off (or true / yes, false / no) as a boolean: the switch gets "on" / "off"."""
    section, name = key.split(".")
    for value, mode in (("on", "on"), ("off", "off"), ("auto", "auto"), ("true", "on"), ("no", "off")):
        assert getattr(getattr(load_config(None, [f"{key}={value}"]), section), name) == mode
