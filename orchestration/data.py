"""Prompt datasets: the built-in arithmetic task, or jsonl / parquet / saved HF datasets.

Every row becomes ``{"prompt": str, "answer": str, **other columns}``. A malformed row
fails at load with its index and the missing field; a prompt longer than
``data.max_prompt_tokens`` fails with its index and the fix.
"""

from __future__ import annotations

import random
from pathlib import Path

import datasets

from policy.models import bos_prefix


class DataError(ValueError):
    pass


def arithmetic_problem(rng: random.Random, min_digits: int, max_digits: int, operators: str) -> dict:
    """One problem such as ``"47+8="`` with answer ``"55"`` (subtraction may go negative)."""
    def operand() -> int:
        digits = rng.randint(min_digits, max_digits)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)
    a, b, op = operand(), operand(), rng.choice(operators)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {"prompt": f"{a}{op}{b}=", "answer": str(value)}


def arithmetic_dataset(num: int, min_digits: int, max_digits: int, operators: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [arithmetic_problem(rng, min_digits, max_digits, operators) for _ in range(num)]


def _load_rows(source: str) -> list[dict]:
    path = Path(source)
    if not path.exists():
        raise DataError(f"data.source={source!r}: no such file or directory; give 'arithmetic', "
                        f"a .jsonl/.parquet file or a directory saved with Dataset.save_to_disk")
    if path.is_file() and path.suffix not in (".jsonl", ".json", ".parquet"):
        raise DataError(f"data.source={source!r}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"data.source={source!r} is an empty file: it has no rows")
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset("parquet" if path.suffix == ".parquet" else "json", data_files=str(path),
                                       split="train")
    except Exception as exc:  # noqa: BLE001 (datasets raises many kinds; each is the file's fault here)
        cause = exc.__cause__ or exc.__context__ or exc
        what = ("a directory saved with Dataset.save_to_disk" if path.is_dir() else
                "a .jsonl file of one JSON object per line" if path.suffix != ".parquet" else "a Parquet file")
        raise DataError(f"data.source={source!r} could not be read as {what}: {type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:300]}"
                        f"{f' (caused by {type(cause).__name__}: {cause})' if cause is not exc else ''}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"data.source={source!r}: a DatasetDict without a 'train' split "
                            f"(splits: {list(ds)})")
        ds = ds["train"]
    return ds.to_list()


# Arguments of a reward function call that a dataset column must not take (rollout.rewards).
RESERVED_COLUMNS = ("prompts", "completions")


def load_prompts(data_cfg, tokenizer) -> list[dict]:
    """Rows with "prompt" and "answer" (the prompt and answer fields' values, the answer as text)
    beside every column of the data, validated: the reward functions get the columns by their own
    names, as TRL passes them (a TRL function taking ``solution`` works with
    ``data.answer_field=solution``)."""
    if data_cfg.source == "arithmetic":
        rows = arithmetic_dataset(data_cfg.num_prompts, data_cfg.min_digits, data_cfg.max_digits,
                                  data_cfg.operators, data_cfg.seed)
        if data_cfg.few_shot > 0:
            shots = arithmetic_dataset(data_cfg.few_shot, data_cfg.min_digits, data_cfg.max_digits,
                                       data_cfg.operators, data_cfg.seed + 1)
            prefix = "".join(f"{r['prompt']}{r['answer']}\n" for r in shots)
            rows = [{**r, "prompt": prefix + r["prompt"]} for r in rows]
        prompt_field, answer_field = "prompt", "answer"
    else:
        rows = _load_rows(data_cfg.source)
        prompt_field, answer_field = data_cfg.prompt_field, data_cfg.answer_field
    if not rows:
        raise DataError(f"data.source={data_cfg.source!r} has no rows")
    names = dict.fromkeys(k for row in rows for k in row)  # rows of a JSONL file may differ
    reserved = [k for k in names if k in RESERVED_COLUMNS and k not in (prompt_field, answer_field)]
    if reserved:
        raise DataError(f"{data_cfg.source}: column(s) {reserved} would collide with the reward functions' own "
                        f"arguments (fn(prompts, completions, **columns)); rename them in the data")
    # Every column is kept, and the prompt and answer fields are also under "prompt" and "answer":
    # a column of the data's own under either name would be overwritten.
    for alias, field_, name in (("prompt", prompt_field, "data.prompt_field"), ("answer", answer_field,
                                                                             "data.answer_field")):
        if field_ != alias and alias in names:
            raise DataError(f"{data_cfg.source}: {name}={field_!r}, and the data has a column {alias!r} of its "
                            f"own, which the {alias} field's value would replace: set {name}={alias!r} or "
                            f"rename the column")
    if data_cfg.chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError("data.chat_template=true, but the model's tokenizer has no chat template (tokenizer_config.json "
                        "'chat_template'): set data.chat_template=false and give the prompts as text")
    # Ids that stand for text the tokenizer cannot encode: its unknown and its pad token where the
    # text they came from is not their own (the built-in tokenizer reads an unknown character as
    # pad; a real one reads "<unk>" or its pad token's text, e.g. "<|endoftext|>", as that token).
    # Without offsets (a slow tokenizer) only the unknown token counts.
    own = {t: text for t, text in ((tokenizer.unk_token_id, tokenizer.unk_token),
                                   (tokenizer.pad_token_id, tokenizer.pad_token)) if t is not None}
    out = []
    for i, row in enumerate(rows):
        for name, key in (("data.prompt_field", prompt_field), ("data.answer_field", answer_field)):
            if row.get(key) is None:
                present = sorted(k for k, v in row.items() if v is not None)
                raise DataError(f"{data_cfg.source}: row {i} has no value for {key!r} ({name}): the field is "
                                f"missing or null; its fields with values are {present}. Fix the row or set {name}.")
        prompt, answer = row[prompt_field], row[answer_field]
        if isinstance(prompt, list):
            if not data_cfg.chat_template:
                raise DataError(f"{data_cfg.source}: row {i}: field {prompt_field!r} is a conversation (a list of "
                                f"messages); set data.chat_template=true to send it through the model's chat "
                                f"template, or point data.prompt_field at a text column")
        elif not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{data_cfg.source}: row {i}: field {prompt_field!r} must be a string with text, "
                            f"got {prompt!r}; fix the row or set data.prompt_field")
        if data_cfg.chat_template:  # (a blank prompt is refused above, before the template's own text)
            prompt = _templated(prompt, tokenizer, f"{data_cfg.source}: row {i}: field {prompt_field!r}",
                                dict(data_cfg.chat_template_kwargs))
        if isinstance(answer, bool) or not isinstance(answer, (str, int)):
            raise DataError(f"{data_cfg.source}: row {i}: field {answer_field!r} (data.answer_field) is "
                            f"{type(answer).__name__} {answer!r}; answers are text (an integer is taken as its "
                            f"digits): convert the column to strings, e.g. 2.0 -> '2'")
        encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
        # as the workers encode it (policy.models.encode_prompt: a BOS, where the model has one)
        n_tokens = len(bos_prefix(tokenizer, encoded.input_ids)) + len(encoded.input_ids)
        if n_tokens > data_cfg.max_prompt_tokens:
            raise DataError(f"{data_cfg.source}: row {i}: prompt is {n_tokens} tokens, longer than "
                            f"data.max_prompt_tokens={data_cfg.max_prompt_tokens}; raise the limit "
                            f"(and rollout.max_model_len) or shorten the prompt")
        spans = encoded.get("offset_mapping")
        bad = [k for k, t in enumerate(encoded.input_ids) if t in own and (
            prompt[slice(*spans[k])] != own[t] if spans is not None else t == tokenizer.unk_token_id)]
        if bad:
            text = sorted({prompt[slice(*spans[k])] for k in bad}) if spans else "?"
            raise DataError(f"{data_cfg.source}: row {i}: the prompt has text the model's tokenizer cannot encode "
                            f"({text}, read as its unknown or pad token): the model would see other text than the "
                            f"reward function; remove it from the prompt, or use a model whose tokenizer has it")
        # (a prompt or answer field named like a reward function argument is under its alias only)
        out.append({**{k: v for k, v in row.items() if k not in RESERVED_COLUMNS},
                    "prompt": prompt, "answer": str(answer)})
    return out


def _templated(prompt, tokenizer, where: str, options: dict | None = None) -> str:
    """The chat template's text for a text prompt (one user message) or a conversation, with the
    assistant's turn opened (data.chat_template), the template given ``options``
    (data.chat_template_kwargs)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages) and any(m["content"].strip() for m in messages)):
        raise DataError(f"{where} is {prompt!r}: with data.chat_template=true a prompt is text or a conversation, "
                        f"a non-empty list of {{'role': str, 'content': str}} messages with some text; fix the row")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **(options or {}))


class PromptStream:
    """Epochs over the rows in a seeded random order; yields (index, row) batches.

    The cursor (epoch, position) is all the state there is, so a run can record it.
    """

    def __init__(self, rows: list[dict], seed: int):
        self.rows, self.seed = rows, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle(self.epoch)

    def next_batch(self, size: int) -> list[tuple[int, dict]]:
        batch = []
        while len(batch) < size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            i = self._order[self.position]
            self.position += 1
            batch.append((i, self.rows[i]))
        return batch
