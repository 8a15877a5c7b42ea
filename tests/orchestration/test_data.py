import json

import datasets
import pytest

from orchestration.config import ConfigError, DataConfig, load_config
from orchestration.data import DataError, PromptStream, arithmetic_dataset, load_prompts
from policy.models import build_char_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_arithmetic_is_seeded_and_correct():
    rows = arithmetic_dataset(200, 1, 3, "+-*", seed=7)
    assert rows == arithmetic_dataset(200, 1, 3, "+-*", seed=7)
    assert rows != arithmetic_dataset(200, 1, 3, "+-*", seed=8)
    for r in rows:
        expr = r["prompt"].removesuffix("=")
        assert str(eval(expr)) == r["answer"]  # the checker, not the generator, evaluates


def _cfg(tmp_path, source, *extra):
    return load_config(None, [f"data.source={source}", *extra]).data


def test_jsonl_parquet_and_saved_dataset(tmp_path, tokenizer):
    rows = [{"question": "1+1=", "solution": "2", "level": 1}, {"question": "2+3=", "solution": "5", "level": 2}]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for source in (jl, tmp_path / "d.parquet", tmp_path / "saved"):
        out = load_prompts(_cfg(tmp_path, source, "data.prompt_field=question", "data.answer_field=solution"),
                           tokenizer)
        # every column kept (a TRL reward function taking `solution` gets it), prompt and answer beside them
        assert out == [{"question": "1+1=", "solution": "2", "level": 1, "prompt": "1+1=", "answer": "2"},
                       {"question": "2+3=", "solution": "5", "level": 2, "prompt": "2+3=", "answer": "5"}]
    from rollout.rewards import check_signatures

    def accuracy_reward(completions, solution, **kwargs):  # open-r1's form
        return [float(c == s) for c, s in zip(completions, solution)]
    check_signatures({"accuracy_reward": accuracy_reward}, [k for k in out[0] if k != "prompt"])  # as grpo.main


def test_missing_field_names_row_and_field(tmp_path, tokenizer):
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" + json.dumps({"prompt": "2+2="}))
    with pytest.raises(DataError, match=r"row 1 has no value for 'answer'.*data.answer_field"):
        load_prompts(_cfg(tmp_path, jl), tokenizer)


def test_too_long_prompt_names_row_and_fix(tmp_path, tokenizer):
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"prompt": "1" * 100, "answer": "2"}))
    with pytest.raises(DataError, match=r"row 0: prompt is 100 tokens.*max_prompt_tokens"):
        load_prompts(_cfg(tmp_path, jl), tokenizer)


def test_missing_source_file(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="data.source=.*no such file"):
        _cfg(tmp_path, tmp_path / "nope.jsonl")
    data_cfg = _cfg(tmp_path, tmp_path)
    data_cfg.source = str(tmp_path / "gone.jsonl")  # deleted after the config was checked
    with pytest.raises(DataError, match="no such file"):
        load_prompts(data_cfg, tokenizer)


def test_prompt_stream_covers_each_row_once_per_epoch():
    rows = [{"i": i} for i in range(10)]
    stream = PromptStream(rows, seed=3)
    first = [i for i, _ in stream.next_batch(4) + stream.next_batch(6)]
    assert sorted(first) == list(range(10)) and stream.epoch == 0
    second = [i for i, _ in stream.next_batch(10)]
    assert sorted(second) == list(range(10)) and stream.epoch == 1 and second != first


def test_few_shot_prefix_is_shared_and_keeps_the_answers(tokenizer):
    base = DataConfig(num_prompts=20)
    plain = load_prompts(base, tokenizer)
    long = load_prompts(DataConfig(num_prompts=20, few_shot=32, max_prompt_tokens=400), tokenizer)
    prefixes = {r["prompt"][:-len(p["prompt"])] for r, p in zip(long, plain)}
    assert len(prefixes) == 1  # one few-shot block, the same before every question
    prefix = prefixes.pop()
    assert all(r["prompt"] == prefix + p["prompt"] and r["answer"] == p["answer"] for r, p in zip(long, plain))
    lines = prefix.splitlines()
    assert len(lines) == 32 and all(eval(line.replace("=", "==")) for line in lines)  # solved examples
    assert len(tokenizer(long[0]["prompt"]).input_ids) >= 256
    with pytest.raises(DataError, match="max_prompt_tokens"):
        load_prompts(DataConfig(num_prompts=20, few_shot=32), tokenizer)


def test_unreadable_sources_name_the_setting_and_the_cause(tmp_path, tokenizer):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + '\n{"prompt": "2+')
    with pytest.raises(DataError, match=r"data.source=.*broken.jsonl' could not be read as a .jsonl file.*JSON parse"):
        load_prompts(_cfg(tmp_path, broken), tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty file"):
        load_prompts(_cfg(tmp_path, empty), tokenizer)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(DataError, match="could not be read as a directory saved with Dataset.save_to_disk"):
        load_prompts(_cfg(tmp_path, folder), tokenizer)


def _rows(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_text_the_tokenizer_cannot_encode_is_refused_naming_it(tmp_path, tokenizer):
    """The built-in tokenizer reads a character outside its vocabulary as its pad token: the model
    would train on other text than the reward function sees."""
    source = _rows(tmp_path, [{"prompt": "1+1=", "answer": "2"}, {"prompt": "3×4=", "answer": "12"}])
    with pytest.raises(DataError, match=r"row 1: the prompt has text the model's tokenizer cannot encode \(\['×'\]"):
        load_prompts(_cfg(tmp_path, source), tokenizer)
    # the pad token's own text is read as the pad token, as a real tokenizer reads "<|endoftext|>": not unknown
    source = _rows(tmp_path, [{"prompt": f"1+1{tokenizer.pad_token}=", "answer": "2"}])
    assert load_prompts(_cfg(tmp_path, source), tokenizer)[0]["prompt"] == f"1+1{tokenizer.pad_token}="


def test_answers_are_text_or_integers(tmp_path, tokenizer):
    source = _rows(tmp_path, [{"prompt": "1+1=", "answer": 2}])
    assert load_prompts(_cfg(tmp_path, source), tokenizer)[0]["answer"] == "2"
    for bad in (2.0, [2], True):
        source = _rows(tmp_path, [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": bad}])
        with pytest.raises(DataError, match=r"row 1: field 'answer' \(data.answer_field\) is .*convert the column"):
            load_prompts(_cfg(tmp_path, source), tokenizer)


def test_columns_named_like_the_reward_arguments_are_refused(tmp_path, tokenizer):
    source = _rows(tmp_path, [{"prompt": "1+1=", "answer": "2", "completions": "x"}])
    with pytest.raises(DataError, match=r"\['completions'\] would collide with the reward functions"):
        load_prompts(_cfg(tmp_path, source), tokenizer)


def test_a_null_field_is_named_as_missing_or_null(tmp_path, tokenizer):
    source = _rows(tmp_path, [{"prompt": "1+1=", "answer": None, "level": 1}])
    with pytest.raises(DataError, match=r"row 0 has no value for 'answer'.*missing or null.*values are \['level', 'prompt'\]"):
        load_prompts(_cfg(tmp_path, source), tokenizer)


def test_a_column_the_prompt_or_answer_alias_would_replace_is_refused(tmp_path, tokenizer):
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"question": "1+1=", "answer": "two", "solution": "2"}))
    with pytest.raises(DataError, match=r"data.answer_field='solution'.*a column 'answer' of its own.*rename"):
        load_prompts(_cfg(tmp_path, jl, "data.prompt_field=question", "data.answer_field=solution"), tokenizer)


def test_a_conversational_or_blank_prompt_is_refused_naming_the_fix(tmp_path, tokenizer):
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}))
    with pytest.raises(DataError, match=r"row 0: field 'prompt' is a conversation.*data.chat_template=true"):
        load_prompts(_cfg(tmp_path, jl), tokenizer)
    jl.write_text(json.dumps({"prompt": "   ", "answer": "2"}))
    with pytest.raises(DataError, match=r"row 0: field 'prompt' must be a string with text"):
        load_prompts(_cfg(tmp_path, jl), tokenizer)


def test_the_chat_template_turns_text_and_conversations_into_the_prompt(tmp_path, tokenizer):
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n"
                  + json.dumps({"prompt": [{"role": "system", "content": "add"}, {"role": "user", "content": "2+2="}],
                                "answer": "4"}))
    with pytest.raises(DataError, match=r"data.chat_template=true, but the model's tokenizer has no chat template"):
        load_prompts(_cfg(tmp_path, jl, "data.chat_template=true"), tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}[assistant]{% endif %}"
                               "{% if enable_thinking is defined and not enable_thinking %}[no think]{% endif %}")
    out = load_prompts(_cfg(tmp_path, jl, "data.chat_template=true"), tokenizer)
    assert [r["prompt"] for r in out] == ["[user]1+1=\n[assistant]", "[system]add\n[user]2+2=\n[assistant]"]
    # the template's options (data.chat_template_kwargs), e.g. Qwen3's non-thinking mode
    off = load_prompts(_cfg(tmp_path, jl, "data.chat_template=true", "data.chat_template_kwargs={enable_thinking: false}"),
                       tokenizer)
    assert off[0]["prompt"] == "[user]1+1=\n[assistant][no think]"
    assert [r["answer"] for r in out] == ["2", "4"]
    # the limit counts the templated prompt: 22 tokens (characters)
    with pytest.raises(DataError, match=r"row 0: prompt is 22 tokens, longer than data.max_prompt_tokens=21"):
        load_prompts(_cfg(tmp_path, jl, "data.chat_template=true", "data.max_prompt_tokens=21"), tokenizer)
    for bad in ([{"role": "user"}], [{"role": "user", "content": " "}]):
        jl.write_text(json.dumps({"prompt": bad, "answer": "4"}))
        with pytest.raises(DataError, match=r"row 0: field 'prompt' is .*a non-empty list of .* with some text"):
            load_prompts(_cfg(tmp_path, jl, "data.chat_template=true"), tokenizer)
    jl.write_text(json.dumps({"prompt": "   ", "answer": "4"}))  # blank before the template's own text
    with pytest.raises(DataError, match=r"row 0: field 'prompt' must be a string with text"):
        load_prompts(_cfg(tmp_path, jl, "data.chat_template=true"), tokenizer)
