"""Shared fixtures for the tests: offline hub settings, the repo root on sys.path, and the tiny model.

`tiny_dir` builds the built-in task's tiny model and tokenizer once per session (seed 0) and saves them
with common.save_model; `tiny` loads a fresh copy from that folder with common.load_model_and_tokenizer,
so every test gets its own model/tokenizer (safe to train or mutate) and the real loading code is used.
"""
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

import common  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Folder holding the saved tiny model + tokenizer (built once per session, seed 0)."""
    path = tmp_path_factory.mktemp("tiny_model")
    model, tokenizer = common.load_model_and_tokenizer("tiny", seed=0)
    common.save_model(model, tokenizer, path)
    return path


@pytest.fixture
def tiny(tiny_dir):
    """A fresh (model, tokenizer) loaded back from tiny_dir with common.load_model_and_tokenizer."""
    return common.load_model_and_tokenizer(str(tiny_dir))
