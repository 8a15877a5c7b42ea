"""A check both engines' stop strings must pass (tests/rollout/test_worker.py, test_vllm_engine.py)."""

STOPS = ["1", "2", "3", "4", "5"]


def assert_stops_end_completions(groups, tokenizer, max_tokens: int) -> None:
    """Each completion ends at the token that completes its first stop string (finish "stop"), at
    EOS ("stop"), or at max_tokens ("length"); nothing follows a stop string; its logprobs are
    its tokens'. Some completion stopped on a string."""
    stopped = 0
    for group in groups:
        for c in group:
            assert len(c.logprobs) == len(c.token_ids)
            before = [tokenizer.decode(c.token_ids[:i]) for i in range(len(c.token_ids))]
            assert not any(s in text for text in before for s in STOPS), (c.token_ids, before)
            if any(s in tokenizer.decode(c.token_ids) for s in STOPS):
                assert c.finish_reason == "stop"
                stopped += 1
            elif c.token_ids and c.token_ids[-1] == tokenizer.eos_token_id:
                assert c.finish_reason == "stop"
            else:
                assert len(c.token_ids) == max_tokens and c.finish_reason == "length", c
    assert stopped > 0
