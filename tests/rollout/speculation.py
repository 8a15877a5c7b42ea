"""Shared pieces of the tests of speculative rollout in vLLM (test_speculative.py: EAGLE and
EAGLE-3 heads; test_native_speculative.py: native MTP layers): the exact distribution of the
first sampled token pairs of a 12-token model and the chi-square test against it, vLLM's greedy
drafting rounds and a replay of them with rlaccel's copy of the drafter, and a short
self-distillation so that some drafts are accepted and some are not.

Chi-square on the 144 (token 2, token 3) pairs of N sequences: positions 2 and 3 are the ones
drafted and verified (token 1 comes from the prefill's target forward). Cells with expected
count < 5 are pooled.
"""

import contextlib
from collections import defaultdict

import torch

from mtp.heads import policy_states

VOCAB, PROMPT, N = 12, [2, 3, 4, 5], 20_000


def exact_pairs(model, temperature: float, top_p: float) -> torch.Tensor:
    """P(x2, x3 | prompt) [V, V] by enumeration, with vLLM's temperature and top-p."""
    def dist(ids):
        with torch.no_grad():
            logits = model(torch.tensor(ids)).logits[:, -1].double() / temperature
        p = torch.softmax(logits, -1)
        if top_p < 1:  # vLLM: drop the smallest tokens while their cumulative mass <= 1 - top_p
            sorted_p, order = p.sort(-1)
            drop = sorted_p.cumsum(-1) <= 1 - top_p
            drop[..., -1] = False
            p = p.scatter(-1, order, sorted_p.masked_fill(drop, 0))
            p = p / p.sum(-1, keepdim=True)
        return p
    p1 = dist([PROMPT])[0]
    p2 = dist([PROMPT + [a] for a in range(VOCAB)])  # [x1, x2]
    p3 = dist([PROMPT + [a, b] for a in range(VOCAB) for b in range(VOCAB)]).view(VOCAB, VOCAB, VOCAB)
    return torch.einsum("a,ab,abc->bc", p1, p2, p3)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of ``counts`` against ``probs`` (cells expecting < 5 pooled). A sample in a
    cell of probability 0 (e.g. a token top-p removes) is impossible under ``probs``: p-value 0
    (pooled, it would vanish in a pool expecting nothing)."""
    if counts.flatten()[probs.flatten() == 0].sum() > 0:
        return 0.0
    expected = probs.flatten() * counts.sum()
    observed = counts.flatten().double()
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def pairs(llm, temperature: float, top_p: float, seed: int) -> torch.Tensor:
    from vllm import SamplingParams
    params = [SamplingParams(n=N // 4, temperature=temperature, top_p=top_p, max_tokens=3, ignore_eos=True,
                             seed=seed + i * N, detokenize=False) for i in range(4)]  # vLLM caps n at 16384
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * 4, params, use_tqdm=False)
    counts = torch.zeros(VOCAB, VOCAB)
    for out in outs:
        for o in out.outputs:
            counts[o.token_ids[1], o.token_ids[2]] += 1
    return counts


@contextlib.contextmanager
def scheduled_drafts(llm):
    """Records the draft tokens vLLM's scheduler sends to be verified, per prompt and round
    (``scheduled_spec_decode_tokens``: what the drafter proposed, as the target then checks it)."""
    from rollout.vllm_spec import _scheduler
    scheduler = _scheduler(llm)
    schedule, rounds = scheduler.schedule, defaultdict(list)

    def recording_schedule(*args, **kwargs):
        out = schedule(*args, **kwargs)
        for req_id, drafts in out.scheduled_spec_decode_tokens.items():
            rounds[tuple(scheduler.requests[req_id].prompt_token_ids)].append([int(t) for t in drafts])
        return out

    scheduler.schedule = recording_schedule
    try:
        yield rounds
    finally:
        scheduler.schedule = schedule


@torch.no_grad()
def replay_greedy_rounds(model, head, spec, plain, k: int = 2, new_tokens: int = 16) -> tuple[dict, dict]:
    """Greedy output of ``spec`` must equal ``plain``'s; returns (vLLM's drafting rounds: the
    drafted token ids of every round per prompt, the draft count and per-position accepted
    counts; the same from a replay of its rounds with rlaccel's ``head`` on ``model``): at each
    round's anchor the head drafts k tokens greedily, each step fed its own previous draft (the
    engine's recursion, not teacher forcing: the drafts after a wrong one count too); they are
    compared with the target's tokens, and the accepted prefix plus the target's own token
    advance the anchor (vLLM counts every verified round of a running sequence)."""
    from vllm import SamplingParams
    prompts = [[2, 3, 4, 5], [7, 7, 2], [9, 3, 6, 8, 2, 4], [5]]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    before = spec.spec_counters()
    with scheduled_drafts(spec.llm) as vllm_rounds:
        got = [list(o.outputs[0].token_ids) for o in spec.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                                        params, use_tqdm=False)]
    after = spec.spec_counters()
    longer = SamplingParams(temperature=0.0, max_tokens=new_tokens + k + 1, ignore_eos=True, detokenize=False)
    full = [list(o.outputs[0].token_ids) for o in plain.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                                      longer, use_tqdm=False)]
    assert got == [f[:new_tokens] for f in full]
    drafts, accepted, rounds = 0, [0] * k, {}
    for prompt, out in zip(prompts, full):
        x = torch.tensor([prompt + out])
        hidden, _ = policy_states(model, x, pre_norm=head.pre_norm_hidden, aux_layers=head.aux_layers)
        draft = []  # draft[j][t]: step j+1's greedy draft at anchor t, fed the head's own earlier drafts
        for j in range(k):
            outs = head.unroll(model.model.embed_tokens, x, hidden, j + 1, draft_tokens=[d[None] for d in draft])
            draft.append(head.draft_logits(outs[-1], model.lm_head.weight)[0].argmax(-1))
        t, generated, rounds[tuple(prompt)] = len(prompt) - 1, 1, []  # the prefill gave the first token
        while generated < new_tokens:
            rounds[tuple(prompt)].append([int(draft[j][t]) for j in range(k)])
            n = 0
            while n < k and int(draft[n][t]) == int(x[0, t + 2 + n]):
                n += 1
            drafts += 1
            for j in range(n):
                accepted[j] += 1
            t, generated = t + n + 1, generated + n + 1
    have = {"drafts": after["drafts"] - before.get("drafts", 0),
            "per_pos": [a - b for a, b in zip(after["accepted_per_pos"], before.get("accepted_per_pos", [0] * k))],
            "rounds": dict(vllm_rounds)}
    return have, {"drafts": drafts, "per_pos": accepted, "rounds": rounds}


def assert_same_rounds(label: str, have: dict, want: dict) -> None:
    """vLLM's greedy rounds (``have``) equal the replay's (``want``): drafted ids, counts."""
    counts = [{k: v for k, v in d.items() if k != "rounds"} for d in (want, have)]
    print(f"{label} greedy rounds: replay", counts[0], "vLLM", counts[1])
    assert have == want


def self_distill(model, head, steps: int) -> None:
    """A few KL steps of the head on the model's own samples (what mtp.train does at length)."""
    from mtp.batch import draft_targets, loss_fn
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(2, VOCAB, (256, 4), generator=g)
    with torch.no_grad():
        seqs = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, max_new_tokens=16,
                              min_new_tokens=16, pad_token_id=0)
    data = [(row.tolist(), 4) for row in seqs]
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    for i in range(steps):
        batch = [data[(i * 32 + j) % len(data)] for j in range(32)]
        loss = loss_fn(draft_targets(model, head, batch, 2, 0), "tv", True, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
