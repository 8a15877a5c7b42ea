"""Packed (P+ΣR) logprobs and gradients equal the unpacked N(P+R) ones, for real HF models."""

import random

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from attention.layout import pack
from orchestration.config import load_config
from policy.batch import Group, pad_sequences
from policy.models import build_char_tokenizer, save_model
from policy.packed import packed_token_logprobs
from policy.trainer import PolicyTrainer, token_logprobs

VOCAB = 50


def _rms_norm_in_input_precision(self, hidden_states):
    upcast = hidden_states.float() if hidden_states.dtype in (torch.float16, torch.bfloat16) else hidden_states
    variance = upcast.pow(2).mean(-1, keepdim=True)
    return self.weight * (upcast * torch.rsqrt(variance + self.variance_epsilon)).to(hidden_states.dtype)


@pytest.fixture(autouse=True)
def exact_float64_norms(monkeypatch):
    """transformers' RMSNorm casts its input to float32 even in a float64 model, which rounds
    the backward's gradients to float32: the N unpacked prompt copies are rounded one by one,
    the packed prompt once after summing, so the two differ at ~1e-7 relative for reasons
    that have nothing to do with packing. The float64 comparison therefore runs the norms in
    the input's precision (the same formula otherwise)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    for cls in (LlamaRMSNorm, Qwen3RMSNorm):
        monkeypatch.setattr(cls, "forward", _rms_norm_in_input_precision)


def _model(arch: str, dtype=torch.float64):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=8, tie_word_embeddings=True))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    model.set_attn_implementation("sdpa")
    return model.to(dtype)


def _groups(n: int, prompt_lens=(7, 3), seed=0):
    rng = random.Random(seed)
    prompts, responses = [], []
    for P in prompt_lens:
        prompt = [rng.randrange(2, VOCAB) for _ in range(P)]
        for _ in range(n):
            prompts.append(prompt)
            responses.append([rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 9))])
    return prompts, responses


def _unpacked(model, prompts, responses, T):
    batch = pad_sequences(prompts, responses, 0)
    return token_logprobs(model, batch, T), batch.response_mask


def _grads(model, logp, mask, w):
    model.zero_grad()
    (logp * mask * w[:, :logp.shape[1]]).sum().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("n", [1, 2, 8])
@pytest.mark.parametrize("backend", ["reference", "regions"])
def test_packed_equals_unpacked_float64(arch, n, backend):
    model = _model(arch)
    prompts, responses = _groups(n)
    ref, mask = _unpacked(model, prompts, responses, 0.8)
    out, out_mask = packed_token_logprobs(model, prompts, responses, 0, 0.8, backend)
    assert torch.equal(out_mask, mask[:, :out.shape[1]])
    assert (out - ref[:, :out.shape[1]]).abs().max() <= 1e-10
    w = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g_ref = _grads(model, ref, mask, w)
    g_out = _grads(model, out, out_mask, w)
    for name in g_ref:
        assert (g_out[name] - g_ref[name]).abs().max() <= 1e-10, name


@pytest.mark.parametrize("backend", ["reference", "regions"])
def test_packed_rows_of_unequal_size_and_a_prompt_seen_twice(backend):
    """Rows of 3, 1 and 2 responses, the first and last with the same prompt (A B A: three rows,
    as only consecutive pairs share one): every row's logprobs land on its own sequences when
    the LM head runs once over all rows' positions (policy.packed)."""
    model = _model("qwen3")
    rng = random.Random(3)
    a, b = ([rng.randrange(2, VOCAB) for _ in range(P)] for P in (6, 4))
    prompts = [a] * 3 + [b] + [a] * 2
    responses = [[rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 9))] for _ in prompts]
    ref, mask = _unpacked(model, prompts, responses, 0.8)
    out, out_mask = packed_token_logprobs(model, prompts, responses, 0, 0.8, backend)
    assert len(pack(prompts, responses, 0).rows) == 3
    assert torch.equal(out_mask, mask[:, :out.shape[1]])
    assert (out - ref[:, :out.shape[1]]).abs().max() <= 1e-10
    w = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g_ref, g_out = _grads(model, ref, mask, w), _grads(model, out, out_mask, w)
    for name in g_ref:
        assert (g_out[name] - g_ref[name]).abs().max() <= 1e-10, name


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_packed_float32_error_within_twice_unpacked(arch):
    """Against the float64 result, packed float32 may err at most ~2x as much as unpacked float32
    (the flash-attention test rule), or 2x the rounding of the result itself (float32's unit
    roundoff times its largest magnitude) should the unpacked error be below that."""
    prompts, responses = _groups(8, prompt_lens=(11, 5))
    exact, _ = _unpacked(_model(arch), prompts, responses, 1.0)
    m32 = _model(arch, torch.float32)
    with torch.no_grad():
        unpacked, mask = _unpacked(m32, prompts, responses, 1.0)
        packed, _ = packed_token_logprobs(m32, prompts, responses, 0, 1.0, "regions")
    R = packed.shape[1]
    err_unpacked = ((unpacked.double() - exact) * mask).abs().max()
    err_packed = ((packed.double() - exact[:, :R]) * mask[:, :R]).abs().max()
    rounding = torch.finfo(torch.float32).eps / 2 * (exact * mask).abs().max()
    assert err_packed <= 2 * max(err_unpacked, rounding), (err_packed, err_unpacked, rounding)


def _step(model_dir, *overrides):
    """One GRPO step (float64, lr 1e-2) on two fixed groups with these config overrides: the
    trainer after it, and the step's metrics."""
    cfg = load_config(None, ["trainer.lr=1e-2", "model.dtype=float64", "trainer.micro_batch_size=6", *overrides])
    trainer = PolicyTrainer(model_dir, cfg.trainer, cfg.algorithm, 1.0, 8, dtype="float64")
    groups = [Group(prompt=str(g), prompt_ids=p, responses=rs, behaviour_logprobs=[[0.0] * len(r) for r in rs],
                    version=0, completions=[""] * 4, rewards=[1.0, 0.0, 0.5, 0.0])
              for g, (p, rs) in enumerate([([3, 74, 3, 82], [[4, 1], [5, 1], [4, 4, 1], [1]]),
                                           ([9, 76, 9, 9, 82], [[6], [7, 7, 1], [8, 1], [9, 9, 9, 1]])])]
    metrics = trainer.step(groups)
    return trainer, metrics


def test_trainer_step_is_the_same_packed_or_not(tiny_model_dir):
    """One GRPO step (float64) with trainer.shared_prompt on and off gives the same weights."""
    def step(shared):
        trainer, metrics = _step(tiny_model_dir, f"trainer.shared_prompt={shared}", "trainer.mini_batches=2")
        return trainer.state_dict(), metrics
    plain, m_plain = step(False)
    packed, m_packed = step(True)
    assert abs(m_plain["loss"] - m_packed["loss"]) <= 1e-12
    for k in plain:
        assert (plain[k] - packed[k]).abs().max() <= 1e-10, k


def test_packed_micro_batches_hold_whole_groups_within_the_unpacked_token_budget(tiny_model_dir):
    """micro_batch_size=2 unpacked rows of the longest sequence (4 + 4 tokens) = 16 tokens per packed
    micro-batch: groups of 4 + 10 = 14 packed tokens go one per micro-batch (two would be 28), so
    four groups take four micro-batches; micro_batch_size=4 (32 tokens) takes two, 8 (64) one."""
    prompts = [[3, 74, 3, 82]] * 4 + [[9, 76, 9, 82]] * 4 + [[5, 5, 5, 5]] * 4 + [[6, 6, 6, 6]] * 4
    responses = [[4, 1], [5, 1], [4, 4, 4, 1], [1, 1]] * 4
    for micro, expected in ((2, 4), (4, 2), (8, 1)):
        cfg = load_config(None, [f"trainer.micro_batch_size={micro}", "trainer.shared_prompt=true"])
        trainer = PolicyTrainer(tiny_model_dir, cfg.trainer, cfg.algorithm, 1.0, 8)
        bins = trainer._micro_batches(prompts, responses, range(16))
        assert len(bins) == expected
        assert sorted(i for b in bins for i in b) == list(range(16))
        groups = [{i // 4 for i in b} for b in bins]  # group g is sequences 4g .. 4g + 3
        assert all(set(b) == {i for g in gs for i in range(4 * g, 4 * g + 4)} for b, gs in zip(bins, groups))
        budget = micro * max(len(p) + len(r) for p, r in zip(prompts, responses))
        packed = [sum(len(prompts[4 * g]) + sum(len(r) for r in responses[4 * g:4 * g + 4]) for g in gs) for gs in groups]
        assert max(packed) <= budget


def test_one_long_response_does_not_pad_other_groups_to_its_length(tiny_model_dir):
    """The regions backend pads every response of a micro-batch to its longest (attention scores
    N·R·(P + R) a row). One group with a 200-token response among groups of 5-token ones: counted
    in real tokens (the old budget, 2 × 210) it shared its micro-batch with another, whose 8 short
    responses were then padded to 200 tokens (~5× the memory of 2 unpacked rows of 210).
    Counted as padded, it goes alone and the short groups fill the other micro-batch."""
    prompts = [[3 + g] * 10 for g in range(8) for _ in range(8)]  # 8 groups of 8
    responses = [[4] * 200] + [[5] * 5] * 63  # group 0: one long response; groups 1-7: short ones
    cfg = load_config(None, ["trainer.micro_batch_size=2", "trainer.shared_prompt=true"])
    trainer = PolicyTrainer(tiny_model_dir, cfg.trainer, cfg.algorithm, 1.0, 200)
    bins = trainer._micro_batches(prompts, responses, range(64))
    assert sorted(sorted({i // 8 for i in b}) for b in bins) == [[0], [1, 2, 3, 4, 5, 6, 7]]


def test_a_model_whose_forward_changes_the_logits_is_refused_for_the_packed_path(tmp_path):
    """Gemma-2 soft-caps its logits after the head: the packed path, which applies the head
    itself, would train on other logprobs than the rollout's; the trainer refuses it by name."""
    tokenizer = build_char_tokenizer()
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, final_logit_softcapping=30.0))
    model_dir = save_model(model, tokenizer, tmp_path)
    cfg = load_config(None, ["trainer.shared_prompt=true"])
    with pytest.raises(ValueError, match="'gemma2'.*trainer.shared_prompt=false"):
        PolicyTrainer(model_dir, cfg.trainer, cfg.algorithm, 1.0, 8)
    cfg = load_config(None, ["trainer.shared_prompt=false"])
    PolicyTrainer(model_dir, cfg.trainer, cfg.algorithm, 1.0, 8)


def test_sliding_window_models_equal_unpacked_within_the_window_and_refuse_beyond_it():
    """Mistral's sliding window (and Qwen's, when used) is a mask the packed path does not apply:
    while every sequence fits in the window it changes nothing and the paths agree; past it the
    packed path refuses instead of attending too far back (0.07 off at a window of 4)."""
    from transformers import MistralConfig, MistralForCausalLM
    rng = random.Random(0)
    prompt = [rng.randrange(2, 50) for _ in range(6)]
    prompts, responses = [prompt, prompt], [[rng.randrange(2, 50) for _ in range(5)] for _ in range(2)]
    for window in (11, 4):  # 6 + 5 tokens: fits in 11, not in 4
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(
            vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, sliding_window=window)).double().eval()
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            ref = token_logprobs(model, pad_sequences(prompts, responses, 0))
            if window == 4:
                with pytest.raises(ValueError, match="sliding-window.*trainer.shared_prompt=false"):
                    packed_token_logprobs(model, prompts, responses, 0, 1.0, "regions")
                continue
            out, _ = packed_token_logprobs(model, prompts, responses, 0, 1.0, "regions")
        assert torch.allclose(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shared", [False, True])
def test_gradient_checkpointing_gives_the_same_step(tiny_model_dir, shared):
    """trainer.gradient_checkpointing recomputes each layer in the backward: the same weights after
    a step (float64), packed or not. Packed, the recomputation must run the shared-prompt attention
    too (the step keeps it on): with the model's own there, a response would attend to the others
    and the gradients would be wrong."""
    def step(checkpointing):
        trainer, _ = _step(tiny_model_dir, f"trainer.shared_prompt={shared}",
                           f"trainer.gradient_checkpointing={checkpointing}")
        assert trainer.model.is_gradient_checkpointing == checkpointing
        return trainer.state_dict()
    kept, recomputed = step(False), step(True)
    for k in kept:
        assert (kept[k] - recomputed[k]).abs().max() <= 1e-12, k


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_logit_chunks_give_the_same_logprobs_and_gradients(arch, packed, chunk):
    """trainer.logit_chunk: the LM head over a few tokens at a time under activation checkpointing
    gives the logprobs and gradients of the head over all at once (float64: the same row
    operations; only how the head's rows are batched and the order in which the chunks' gradient
    contributions are summed differ, a few ulps of values of order 1)."""
    model = _model(arch)
    prompts, responses = _groups(4)

    def logprobs(logit_chunk):
        if packed:
            return packed_token_logprobs(model, prompts, responses, 0, 0.8, "regions", logit_chunk)
        batch = pad_sequences(prompts, responses, 0)
        return token_logprobs(model, batch, 0.8, logit_chunk), batch.response_mask
    ref, mask = logprobs(0)
    out, out_mask = logprobs(chunk)
    assert torch.equal(out_mask, mask) and int(mask.sum()) > 3 * chunk  # several chunks
    assert (out - ref).abs().max() <= 1e-12
    w = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g_ref, g_out = _grads(model, ref, mask, w), _grads(model, out, out_mask, w)
    head = next(k for k, p in model.named_parameters() if p is model.get_output_embeddings().weight)
    assert g_ref[head].abs().max() > 0  # the head's gradient (tied to the embedding in qwen3) is compared
    for name in g_ref:
        assert (g_out[name] - g_ref[name]).abs().max() <= 1e-12, name


@pytest.mark.parametrize("shared, checkpointing", [(False, False), (True, False), (True, True)])
def test_a_step_with_logit_chunks_is_the_same(tiny_model_dir, shared, checkpointing):
    """One GRPO step (float64) with trainer.logit_chunk=3 gives the weights of one without chunks,
    packed or not, and with the decoder layers checkpointed too."""
    def step(chunk):
        trainer, metrics = _step(tiny_model_dir, f"trainer.shared_prompt={shared}", f"trainer.logit_chunk={chunk}",
                                 f"trainer.gradient_checkpointing={checkpointing}")
        return trainer.state_dict(), metrics
    (whole, m_whole), (chunked, m_chunked) = step(0), step(3)
    assert abs(m_whole["loss"] - m_chunked["loss"]) <= 1e-12
    for k in whole:
        assert (whole[k] - chunked[k]).abs().max() <= 1e-12, k


@pytest.mark.parametrize("packed", [False, True])
def test_logit_chunks_keep_no_logits_for_the_backward(packed):
    """What the chunks are for: without them autograd keeps the [positions, V] log-softmax for the
    backward; with them it keeps no [rows, V] tensor at all (each chunk's are recomputed)."""
    model = _model("qwen3")
    prompts, responses = _groups(4)

    def saved_logit_rows(logit_chunk) -> int:
        rows = []

        def keep(t):
            if t.dim() == 2 and t.shape[-1] == VOCAB:
                rows.append(t.shape[0])
            return t
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            if packed:
                packed_token_logprobs(model, prompts, responses, 0, 0.8, "regions", logit_chunk)
            else:
                token_logprobs(model, pad_sequences(prompts, responses, 0), 0.8, logit_chunk)
        return sum(rows)
    positions = sum(len(r) for r in responses) - 2 * (4 - 1)  # packed: a group's first tokens share one
    assert saved_logit_rows(0) >= positions
    assert saved_logit_rows(3) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_tempered_logits_are_the_divided_ones_bit_for_bit(dtype, temperature):
    """policy.packed.tempered leaves the division out at temperature 1: x / 1 is x in IEEE
    arithmetic, forward and backward, so the log-softmax and its gradient are the same bits as the
    division's (and at any other temperature it divides)."""
    from policy.packed import tempered
    torch.manual_seed(0)
    logits = (torch.randn(7, 29) * 3).to(dtype)
    g = torch.randn(7, 29)
    got_x, want_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = torch.log_softmax(tempered(got_x, temperature), dim=-1)
    want = torch.log_softmax(want_x.float() / temperature, dim=-1)
    (got * g).sum().backward()
    (want * g).sum().backward()
    assert got.dtype == torch.float32 and torch.equal(got, want) and torch.equal(got_x.grad, want_x.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lm_heads_row_chunked_weight_gradient_is_the_same_product(monkeypatch, dtype):
    """policy.packed.lm_head against nn.Linear: the same forward and input gradient (the same
    products), and a weight gradient whose every element is the same T-long dot product, made in
    row chunks (here 5 rows, the last chunk short): each side sums T products in float32 (exact
    for bfloat16 inputs) in some order and rounds once to the weight's dtype, so they differ by at
    most the two sums' error bound, 2·T·2⁻²⁴·Σ|g·h|, plus one unit in the last place of the dtype."""
    import policy.packed as packed
    monkeypatch.setattr(packed, "HEAD_GRAD_ROWS", 5)
    torch.manual_seed(0)
    T, d, V = 37, 16, 23
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(d, V, bias=False).to(dtype)
    h = torch.randn(T, d, dtype=dtype, requires_grad=True)
    g = torch.randn(T, V, dtype=dtype)
    out = packed.lm_head(model, h)
    assert out.grad_fn.name().endswith("_RowChunkedHeadBackward")
    (out * g).sum().backward()
    got_h, got_w = h.grad.clone(), model.lm_head.weight.grad.clone()
    h.grad = model.lm_head.weight.grad = None
    want = model.lm_head(h)
    (want * g).sum().backward()
    assert torch.equal(out, want) and torch.equal(got_h, h.grad)
    ref = model.lm_head.weight.grad.double()
    size = g.double().abs().t() @ h.detach().double().abs()                          # Σ|g·h| per element
    ulp = torch.finfo(dtype).eps * ref.abs()
    bound = 2 * T * 2.0 ** -24 * size + ulp + 2.0 ** -126
    assert ((got_w.double() - ref).abs() <= bound).all()
    # a head with a hook (ZeRO-3 gathers its weight in one) is called as a module
    calls = []
    model.lm_head.register_forward_pre_hook(lambda *_: calls.append(1))
    packed.lm_head(model, h)
    assert calls == [1]


@pytest.mark.parametrize("logit_chunk", [0, 4])
def test_a_tied_heads_gradient_into_grad_is_the_same_sum_without_the_copy(logit_chunk):
    """PolicyTrainer marks a one-process model whose head is tied to a sparse embedding: the head's
    weight gradient becomes ``.grad`` itself and the embedding's rows are added in place. Two
    micro-batches' gradients equal autograd's own sum bit for bit, and the whole-matrix out-of-place
    add is gone (logit chunks keep it: the head is then used more than once)."""
    from torch.profiler import ProfilerActivity, profile

    from policy.packed import head_logprobs
    from policy.trainer import sparse_tied_embedding
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    models = [Qwen3ForCausalLM(config) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    grads, adds = [], []
    for model, mark in zip(models, (False, True)):
        assert sparse_tied_embedding(model)
        model.rlaccel_head_grad_into_param = mark
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for seed in (1, 2):  # two micro-batches into the same .grad
                ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(seed))
                hidden = model.model(input_ids=ids).last_hidden_state[0, :-1]
                logp = head_logprobs(model, hidden, torch.arange(8), ids[0, 1:], 1.0, logit_chunk)
                (-logp.sum()).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        adds.append(sum(e.name == "aten::add" and list(e.input_shapes[0]) == [VOCAB, 16] for e in prof.events()))
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
    assert adds[0] >= 1 and adds[1] == (adds[0] if logit_chunk else adds[0] - 1)
    # torch.autograd.grad accumulates nothing: the whole gradient is returned and .grad left alone
    marked = models[1]
    marked.zero_grad(set_to_none=True)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    logp = head_logprobs(marked, marked.model(input_ids=ids).last_hidden_state[0, :-1], torch.arange(8), ids[0, 1:],
                         1.0, logit_chunk)
    weight = marked.lm_head.weight
    (got,) = torch.autograd.grad(-logp.sum(), [weight])
    assert weight.grad is None
    models[0].zero_grad(set_to_none=True)
    logp = head_logprobs(models[0], models[0].model(input_ids=ids).last_hidden_state[0, :-1], torch.arange(8),
                         ids[0, 1:], 1.0, logit_chunk)
    (-logp.sum()).backward()
    assert torch.equal(got.to_dense(), models[0].lm_head.weight.grad)


def test_a_tied_heads_gradient_buffer_is_kept_between_steps_unless_a_caller_kept_the_gradient():
    """The marked head's weight gradient is written into a buffer kept from one backward to the
    next once .grad has been set to None (policy.packed._kept_grad: a new [V, d] each step grew the
    CPU trainer's heap), wholly overwritten (the same gradient as in a new buffer, the embedding's
    rows added once); a gradient a caller kept is not written over (a new buffer then)."""
    from policy.packed import head_logprobs
    from policy.trainer import sparse_tied_embedding
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    assert sparse_tied_embedding(model)
    model.rlaccel_head_grad_into_param = True
    weight = model.lm_head.weight

    def backward(seed: int) -> None:
        model.zero_grad(set_to_none=True)
        ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(seed))
        hidden = model.model(input_ids=ids).last_hidden_state[0, :-1]
        (-head_logprobs(model, hidden, torch.arange(8), ids[0, 1:], 1.0, 0).sum()).backward()

    backward(1)
    kept, kept_values = weight.grad, weight.grad.clone()
    assert kept._base is not None  # a view of the kept buffer
    backward(2)  # the caller holds the first gradient: a new buffer
    buffer = weight.grad._base
    assert buffer is not None and buffer is not kept._base and torch.equal(kept, kept_values)
    second = weight.grad.clone()
    del kept
    backward(2)  # nothing holds the second: its buffer again, the same gradient
    assert weight.grad._base is buffer and torch.equal(weight.grad, second)
    backward(1)
    assert weight.grad._base is buffer and torch.equal(weight.grad, kept_values)
