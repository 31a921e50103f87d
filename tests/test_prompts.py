"""The prompt suite for real-model evaluation, prompts/real_model_eval.jsonl.

Long prompts must exceed 500 tokens of a GPT-2-style BPE; English prose runs at about 4.5 to 5
characters per token there (the long prompts measure 776 to 839 SmolLM2 tokens for 3835 to 4225
characters), so more than 3000 characters is safely more than 500 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "prompts" / "real_model_eval.jsonl"
CATEGORIES = {"chat", "factual", "reasoning", "code", "long"}
MIN_PROMPTS = 16
MIN_LONG_PROMPTS = 3
MIN_LONG_CHARS = 3000


@pytest.fixture(scope="module")
def prompts() -> list[dict]:
    lines = SUITE.read_text(encoding="utf-8").splitlines()
    assert all(line.strip() for line in lines), "blank line in the suite"
    return [json.loads(line) for line in lines]


def test_every_prompt_has_exactly_the_three_fields(prompts):
    for prompt in prompts:
        assert set(prompt) == {"id", "category", "prompt"}, prompt
        assert all(isinstance(prompt[key], str) and prompt[key].strip() for key in prompt), prompt
        assert prompt["category"] in CATEGORIES, prompt["id"]


def test_size_ids_and_categories(prompts):
    assert len(prompts) >= MIN_PROMPTS
    ids = [prompt["id"] for prompt in prompts]
    assert len(set(ids)) == len(ids)
    assert {prompt["category"] for prompt in prompts} == CATEGORIES


def test_long_prompts_are_long(prompts):
    long_prompts = [prompt for prompt in prompts if prompt["category"] == "long"]
    assert len(long_prompts) >= MIN_LONG_PROMPTS
    for prompt in long_prompts:
        assert len(prompt["prompt"]) > MIN_LONG_CHARS, prompt["id"]
