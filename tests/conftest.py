"""Shared fixtures: a tiny built-in model directory (random weights, no warm start)."""

import pytest
import torch

from policy.models import build_char_tokenizer, build_model, save_model

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    tokenizer = build_char_tokenizer()
    model = build_model("tiny", tokenizer, seed=0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_model_dir_b(tmp_path_factory):
    """Same architecture, different weights (seed 1): for weight-update tests."""
    tokenizer = build_char_tokenizer()
    model = build_model("tiny", tokenizer, seed=1)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("tiny_model_b"))
