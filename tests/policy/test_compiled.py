"""trainer.compile (policy/compiled.py): compiled decoder layers train as the eager ones do, and
the rule that picks them."""

import logging

import pytest
import torch

from mtp.heads import policy_states
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
@pytest.mark.parametrize("overrides", [
    ["trainer.shared_prompt=false"],
    # and a no-grad pass (the old logprobs of two mini-batches) and a KL term's reference model
    ["trainer.shared_prompt=true", "trainer.mini_batches=2", "algorithm.kl_coef=0.1"],
], ids=["unpacked", "packed-two_mini_batches-kl"])
def test_compiled_layers_train_as_the_eager_ones_in_float64(tiny_model_dir, overrides):
    """Two float64 steps with compiled layers and with eager ones: the same gradients and weights up
    to rounding (the same math; fused loops only regroup it), and the compiled graphs did run."""
    grads, weights = {}, {}
    for mode in ("on", "off"):
        torch._dynamo.reset()  # graphs of an earlier test in this process would be reused, not counted
        torch._dynamo.utils.counters.clear()
        t = _trainer(tiny_model_dir, *overrides, f"trainer.compile={mode}")
        assert t.compiled_layers == (len(decoder_layers(t.model)) if mode == "on" else 0)
        for groups in _batches():
            t.step(groups)
        assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) == (mode == "on")
        grads[mode] = {n: p.grad.clone() for n, p in t.model.named_parameters()}
        weights[mode] = {k: v.clone() for k, v in t.model.state_dict().items()}
    assert max(float(g.abs().max()) for g in grads["off"].values()) > 0
    _assert_same_update(grads["on"], grads["off"])
    _assert_same_update(weights["on"], weights["off"])


@pytest.mark.slow
def test_hooks_see_the_hidden_states_of_compiled_layers(tiny_model_dir):
    """The drafter heads' inputs are captured by hooks that mtp.heads.policy_states adds to decoder
    layers for one forward (mtp.maintain runs it on the trainer's model): compiled layers call
    hooks added after their compile, a new closure each time, and give the eager model's states."""
    model = load_model(tiny_model_dir, torch.float32)
    tokens = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    aux = (1, model.config.num_hidden_layers)
    other = tokens.flip(0)
    with torch.no_grad():
        eager = [policy_states(model, t, aux_layers=aux) for t in (tokens, other)]
        assert compile_layers(model, "on", "cpu", 1, False, lambda: model(input_ids=tokens, use_cache=False)) > 0
        compiled_states = [policy_states(model, t, aux_layers=aux) for t in (tokens, other)]  # new hooks each call
    for got, want in zip(compiled_states, eager):
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)  # float32: the same values up to rounding


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
    runs = (("oracle", "float64", "off"), ("eager", "bfloat16", "off"), ("compiled", "bfloat16", "on"))
    for name, dtype, mode in runs:
        t = _trainer(tiny_model_dir, "trainer.shared_prompt=true", f"trainer.compile={mode}", dtype=dtype)
        logp, mask = t._logprobs(t.model, prompts, responses, idx)
        (logp * mask).sum().backward()
        results[name] = (logp.detach().double(), {n: p.grad.double() for n, p in t.model.named_parameters()})
    oracle_logp, oracle_grads = results.pop("oracle")

    def relative(g, n):
        return float((g - oracle_grads[n]).norm() / oracle_grads[n].norm().clamp_min(1e-30))
    error = {name: ((logp - oracle_logp).abs().max(), max(relative(g, n) for n, g in grads.items()))
             for name, (logp, grads) in results.items()}
    assert error["eager"][0] > 0 and error["eager"][1] > 0  # bfloat16 rounds: the bound below is not vacuous
    assert error["compiled"][0] <= 2 * error["eager"][0], error
    assert error["compiled"][1] <= 2 * error["eager"][1], error


def test_auto_compiles_only_large_models_on_one_cpu_rank(tiny_model_dir, monkeypatch):
    model = load_model(tiny_model_dir, torch.float32)
    layers = len(decoder_layers(model))
    assert layers == model.config.num_hidden_layers
    warm_ups = []
    assert compile_layers(model, "auto", "cpu", 1, False, lambda: warm_ups.append(1)) == 0  # ~1M parameters
    monkeypatch.setattr(compiled, "AUTO_MIN_PARAMETERS", 0)
    for device, world_size, checkpointing in (("cuda", 1, False), ("cpu", 2, False), ("cpu", 1, True)):
        assert compile_layers(model, "auto", device, world_size, checkpointing, lambda: warm_ups.append(1)) == 0
    assert compile_layers(model, "off", "cpu", 1, False, lambda: warm_ups.append(1)) == 0
    assert all(m._compiled_call_impl is None for m in decoder_layers(model)) and not warm_ups
    assert compile_layers(model, "auto", "cpu", 1, False, lambda: warm_ups.append(1)) == layers
    assert warm_ups == [1]
    assert all(m._compiled_call_impl is not None for m in decoder_layers(model))


@pytest.mark.parametrize("where", ["compile", "warm_up"])
def test_a_failed_compile_falls_back_under_auto_and_raises_under_on(tiny_model_dir, monkeypatch, caplog, where):
    """A compile that fails, when the layers are wrapped or when the warm-up builds them: "auto"
    leaves the layers eager with a warning, "on" raises naming the way out."""
    model = load_model(tiny_model_dir, torch.float32)
    monkeypatch.setattr(compiled, "AUTO_MIN_PARAMETERS", 0)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")
    if where == "compile":
        monkeypatch.setattr(torch, "compile", no_compiler)
    with caplog.at_level(logging.WARNING, logger="policy.compiled"):
        assert compile_layers(model, "auto", "cpu", 1, False, no_compiler) == 0
    assert "they stay eager" in caplog.text and "no C++ compiler found" in caplog.text
    assert all(m._compiled_call_impl is None for m in decoder_layers(model))
    with pytest.raises(RuntimeError,
                       match="trainer.compile=on: compiling the decoder layers failed.*trainer.compile=off"):
        compile_layers(model, "on", "cpu", 1, False, no_compiler)
    assert all(m._compiled_call_impl is None for m in decoder_layers(model))


def test_on_refuses_what_it_cannot_compile(tiny_model_dir):
    model = load_model(tiny_model_dir, torch.float32)
    with pytest.raises(ValueError, match="gradient_checkpointing.*trainer.compile=off"):
        compile_layers(model, "on", "cpu", 1, True, lambda: None)
    with pytest.raises(ValueError, match="nothing to compile"):
        compile_layers(torch.nn.Linear(2, 2), "on", "cpu", 1, False, lambda: None)
    with pytest.raises(ValueError, match="choose one of"):
        compile_layers(model, "yes", "cpu", 1, False, lambda: None)


@pytest.mark.parametrize("key", ["trainer.compile", "trainer.fused_master_step"])
def test_on_and_off_overrides_are_the_modes_not_booleans(key):
    """YAML reads a bare on / off (or true / yes, false / no) as a boolean: the switch gets "on" / "off"."""
    section, name = key.split(".")
    for value, mode in (("on", "on"), ("off", "off"), ("auto", "auto"), ("true", "on"), ("no", "off")):
        assert getattr(getattr(load_config(None, [f"{key}={value}"]), section), name) == mode
