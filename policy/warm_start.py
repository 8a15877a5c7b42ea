"""Supervised warm start: a short cross-entropy fit on (prompt, answer) pairs.

RL from a random 1M-parameter model would never see a reward; a few hundred SFT steps give
a policy that is right some of the time when sampling at temperature 1 — above zero, far
from solved — which is where GRPO has signal. Loss on answer tokens and EOS only.

``label_smoothing`` ε trains towards (1 − ε)·one-hot + ε·uniform (Szegedy et al. 2016), so
the warm-started policy is diffuse: its mode is often right while samples at temperature 1
often are not, like a pretrained model before RL. GRPO's first gains on such a policy come
from concentrating probability on what it already knows, and then from learning more.
"""

from __future__ import annotations

import random

import torch
from tqdm import tqdm

from policy.batch import pad_sequences


def warm_start(model, tokenizer, examples: list[tuple[str, str]], steps: int, lr: float, batch_size: int,
               seed: int = 0, progress: bool = True, label_smoothing: float = 0.0) -> list[float]:
    """Trains ``model`` in place; returns the loss per step."""
    rng = random.Random(seed)
    encoded = [(tokenizer(p, add_special_tokens=False).input_ids,
                tokenizer(a, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]) for p, a in examples]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="warm start (SFT)", disable=not progress, leave=False)
    for _ in bar:
        chunk = [encoded[rng.randrange(len(encoded))] for _ in range(batch_size)]
        batch = pad_sequences([p for p, _ in chunk], [a for _, a in chunk], tokenizer.pad_token_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logits = logits.gather(1, batch.predict_pos[..., None].expand(-1, -1, logits.shape[-1]))  # [B, R, V]
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.targets, reduction="none",
                                                      label_smoothing=label_smoothing)  # [B, R]
        loss = (per_token * batch.response_mask).sum() / batch.response_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
