"""Shared fixtures: a tiny built-in model directory (random weights, no warm start)."""

import os

# Idle OpenMP threads sleep instead of spinning: the two pytest-xdist workers, and the Ray actors
# and jobs the tests start, share 2 cores, where a spinning thread takes a core from a process
# that has work. Set before torch loads its OpenMP runtime; inherited by every process started here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# The speculative-rollout tests' shared checks assert in a helper module: rewrite its asserts too.
pytest.register_assert_rewrite("tests.rollout.speculation")

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


def pytest_collection_modifyitems(config, items):
    """The end-to-end test first: at ~12 min it is the suite's longest, and started late on one
    pytest-xdist worker it would run on after the other worker has emptied the queue."""
    items.sort(key=lambda item: 0 if "tests/e2e/" in item.nodeid or item.nodeid.startswith("e2e/") else 1)
