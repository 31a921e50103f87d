"""Prompt formats (tq.models.chat): chat models get each prompt as one user turn of their chat
template, on both engines; the real-model record says how many tokens each prompt contributed
and flags answers that end at once; a reference made in one format refuses the other; the report
flags compare records that scored few tokens. Tiny random models (a few seconds), plus one check
against Hugging Face's own rendering on SmolLM2 (skipped without its bundle)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.models_fixtures import tiny_bundle
from tq.cache.config import CacheConfig
from tq.cli import main
from tq.engines.onnx import OnnxRunner
from tq.engines.source import ModelSource
from tq.models.bundle import ModelBundle, write_bundle_info
from tq.models.chat import ChatTemplateError, PromptFormat, render_chat
from tq.models.checkpoint import Checkpoint
from tq.models.prepare import prepare_bundle
from tq.models.tiny import IM_START, build_tiny
from tq.report import summary_table, write_report
from tq.tasks.compare import answer_lengths, run_real_model
from tq.tasks.exact_run import ReferenceError
from tq.tasks.needle import NeedlePromptBuilder

# ChatML, as SmolLM2 writes it (without its system turn); the tiny tokenizer knows both tokens.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
HEAD, TAIL = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = ["The capital of France is", "Keys and values are cached."]
THREE_BIT = CacheConfig(key_bits=3, value_bits=3)


def _rewrite_info(path, **changes) -> None:
    """Rewrite a copied bundle's ``bundle.json`` after its files were changed (with ``changes``)."""
    info = json.loads((path / "bundle.json").read_text())
    info = {key: value for key, value in info.items() if key not in ("sha256", "files")} | changes
    write_bundle_info(path, info)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The tiny-llama bundle: no chat template."""
    return tiny_bundle(tmp_path_factory.getbasetemp(), "tiny-llama")


@pytest.fixture(scope="module")
def chat(plain, tmp_path_factory):
    """A copy of the tiny-llama bundle with a ChatML ``chat_template.jinja``."""
    path = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(plain, path)
    (path / "chat_template.jinja").write_text(CHATML)
    _rewrite_info(path)
    return path


def _files_with_bos(plain, tmp_path, template: str):
    """A tokenizer that puts ``<|endoftext|>`` (id 0) in front of every text, with ``template``."""
    from tokenizers.processors import TemplateProcessing

    path = tmp_path / "bos"
    shutil.copytree(plain, path)
    tokenizer = ModelBundle.load(path).tokenizer()
    bos = "<|endoftext|>"
    tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "chat_template.jinja").write_text(template)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"bos_token": bos}))
    _rewrite_info(path)
    return ModelBundle.load(path)


# --- the helper ---------------------------------------------------------------------------


def test_chat_prompt_is_one_user_turn(chat):
    bundle = ModelBundle.load(chat)
    assert render_chat(bundle) == (HEAD, TAIL)
    formatter = PromptFormat(bundle)
    assert formatter.format == "chat" and formatter.chat
    ids = formatter.encode(PROMPTS[0])
    head_ids = formatter.encode_plain(HEAD)
    assert head_ids[0] == bundle.tokenizer().token_to_id(IM_START)
    assert ids[: len(head_ids)] == head_ids
    assert ids[-len(formatter.encode_plain(TAIL)) :] == formatter.encode_plain(TAIL)
    assert bundle.decode(ids) == HEAD + PROMPTS[0] + TAIL
    assert ids != bundle.encode(PROMPTS[0])


def test_raw_format_and_models_without_template_get_the_text_as_it_is(chat, plain):
    bundle = ModelBundle.load(chat)
    raw = PromptFormat(bundle, "raw")
    assert raw.format == "raw" and raw.head_ids == []
    assert raw.encode(PROMPTS[0]) == bundle.encode(PROMPTS[0])
    plain_bundle = ModelBundle.load(plain)
    assert render_chat(plain_bundle) is None
    fallback = PromptFormat(plain_bundle, "chat")
    assert fallback.requested == "chat" and fallback.format == "raw"
    assert fallback.encode(PROMPTS[1]) == plain_bundle.encode(PROMPTS[1])
    with pytest.raises(ChatTemplateError, match="prompt format must be one of"):
        PromptFormat(bundle, "markdown")


@pytest.mark.parametrize("writes_bos", [True, False])
def test_the_tokenizers_bos_comes_once(plain, tmp_path, writes_bos):
    """A BOS the tokenizer puts in front of every text is kept once: from the template when it
    writes it, else added in front of the chat text."""
    template = ("{{ bos_token }}" if writes_bos else "") + CHATML
    bundle = _files_with_bos(plain, tmp_path, template)
    assert bundle.encode("") == [0]
    formatter = PromptFormat(bundle)
    ids = formatter.encode(PROMPTS[0])
    assert ids[:2] == [0, bundle.tokenizer().token_to_id(IM_START)]
    assert ids.count(0) == 1
    assert formatter.head_ids == ids[: len(formatter.head_ids)]
    assert PromptFormat(bundle, "raw").encode(PROMPTS[0])[0] == 0


def test_template_that_drops_the_message_is_refused(plain, tmp_path):
    bundle = _files_with_bos(plain, tmp_path, "<|im_start|>assistant\n")
    with pytest.raises(ChatTemplateError, match="does not place the user message once"):
        PromptFormat(bundle)


def test_checkpoint_template_in_tokenizer_config(tmp_path):
    """An older checkpoint keeps its template in tokenizer_config.json; a newer one writes
    chat_template.jinja, which the bundle prepared from it carries: both engines see one format."""
    checkpoint = build_tiny("tiny-llama", tmp_path / "hf")
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": CHATML}))
    assert not (checkpoint / "chat_template.jinja").exists()
    files = Checkpoint.load(checkpoint)
    assert render_chat(files) == (HEAD, TAIL)
    bundle = ModelBundle.load(prepare_bundle(model_dir=checkpoint, out=tmp_path / "bundle"))
    assert (bundle.path / "chat_template.jinja").is_file()
    assert PromptFormat(bundle).encode(PROMPTS[0]) == PromptFormat(files).encode(PROMPTS[0])
    records = [
        run_real_model(source, PROMPTS, "exact", max_new_tokens=3)
        for source in (ModelSource(bundle.path), ModelSource(checkpoint, engine="transformers"))
    ]
    for record in records:
        assert record["config"]["prompt_format"] == "chat"
    first, second = ([row["prompt_tokens"] for row in r["metrics"]["per_prompt"]] for r in records)
    assert first == second == [len(PromptFormat(files).encode(p)) for p in PROMPTS]


def test_smollm2_chat_format_equals_transformers_rendering(smollm2_bundle):
    from transformers import AutoTokenizer

    bundle = ModelBundle.load(smollm2_bundle)
    theirs = AutoTokenizer.from_pretrained(smollm2_bundle)
    ours = PromptFormat(bundle)
    for prompt in PROMPTS:
        expected = theirs.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        assert ours.encode(prompt) == list(expected)
    assert bundle.decode(ours.encode(PROMPTS[0])).startswith("<|im_start|>system\n")


def test_needle_builds_on_the_same_chat_header(chat):
    bundle = ModelBundle.load(chat)
    filler = "\n\n".join(f"Sentence {n} is about keys and values. It is short." for n in range(200))
    builder = NeedlePromptBuilder(bundle, filler)
    prompt = builder.build(192, 0.5, trial=0)
    head_ids = PromptFormat(bundle).head_ids
    assert builder.chat
    assert prompt.context_ids[: len(head_ids)] == head_ids
    assert bundle.decode(prompt.query_ids).endswith(TAIL)


# --- the record ---------------------------------------------------------------------------


def test_answer_lengths_count_and_warn():
    counted = answer_lengths([[2], [5, 6, 7, 8], [9, 2]], 4, [2])
    assert counted["exact_answer_tokens"] == 7 and counted["possible_tokens"] == 12
    assert counted["prompts_ended_at_once"] == 1
    assert len(counted["warnings"]) == 1 and "1 of 3 exact answers end at once" in counted["warnings"][0]
    few = answer_lengths([[2], [2], [5, 2]], 4, [2])
    assert few["prompts_ended_at_once"] == 2
    assert any("4 of 12 possible tokens" in warning for warning in few["warnings"])
    full = answer_lengths([[5, 6], [7, 2]], 2, [2])
    assert full["warnings"] == [] and full["prompts_ended_at_once"] == 0


def test_record_states_format_and_tokens_per_prompt(chat):
    record = run_real_model(chat, PROMPTS, "compare", THREE_BIT, max_new_tokens=5)
    config, metrics = record["config"], record["metrics"]
    assert config["prompt_format"] == "chat" and config["prompt_format_requested"] == "chat"
    rows = metrics["per_prompt"]
    formatter = PromptFormat(ModelBundle.load(chat))
    assert [row["prompt_tokens"] for row in rows] == [len(formatter.encode(p)) for p in PROMPTS]
    for row in rows:
        assert 1 <= row["exact_tokens"] <= 5
        assert row["scored_tokens"] == row["exact_tokens"]
    assert metrics["scored_tokens"] == sum(row["scored_tokens"] for row in rows)
    assert metrics["exact_answer_tokens"] == metrics["scored_tokens"]
    assert metrics["possible_tokens"] == 10
    raw = run_real_model(chat, PROMPTS, "exact", max_new_tokens=5, prompt_format="raw")
    assert raw["config"]["prompt_format"] == "raw"
    assert [row["prompt_tokens"] for row in raw["metrics"]["per_prompt"]] == [
        len(ModelBundle.load(chat).encode(p)) for p in PROMPTS
    ]
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        run_real_model(chat, PROMPTS, "exact", max_new_tokens=5, prompt_format="markdown")


@pytest.fixture(scope="module")
def ends_at_once(chat, tmp_path_factory):
    """A copy of the chat bundle whose EOS tokens are the ones it answers PROMPTS with first, so
    that every exact answer ends at once."""
    bundle = ModelBundle.load(chat)
    runner = OnnxRunner(bundle)
    firsts = sorted({runner.generate(PromptFormat(bundle).encode(p), 1).tokens[0] for p in PROMPTS})
    path = tmp_path_factory.mktemp("eos") / "tiny-chat-eos"
    shutil.copytree(chat, path)
    _rewrite_info(path, eos_token_ids=firsts)
    return path


def test_answers_that_end_at_once_are_flagged(ends_at_once):
    source = ModelSource(ends_at_once, name="tiny-eos")
    record = run_real_model(source, PROMPTS, "compare", THREE_BIT, max_new_tokens=8)
    metrics = record["metrics"]
    rows = metrics["per_prompt"]
    assert [(row["exact_tokens"], row["scored_tokens"]) for row in rows] == [(1, 1), (1, 1)]
    assert metrics["prompts_ended_at_once"] == 2
    assert metrics["scored_tokens"] == metrics["exact_answer_tokens"] == 2
    assert metrics["possible_tokens"] == 16
    assert any("2 of 2 exact answers end at once" in warning for warning in metrics["warnings"])
    assert any("2 of 16 possible tokens" in warning for warning in metrics["warnings"])


def test_cli_prompt_format(chat, tmp_path):
    out = tmp_path / "raw.json"
    args = ["bench", "--workload", "real-model", "--real-model-dir", str(chat), "--prompt", PROMPTS[0]]
    args += ["--real-eval-mode", "exact", "--max-new-tokens", "2", "--json", str(out)]
    assert main([*args, "--prompt-format", "raw"]) == 0
    raw = json.loads(out.read_text())
    assert main(args) == 0
    default = json.loads(out.read_text())
    assert raw["config"]["prompt_format"] == "raw" and default["config"]["prompt_format"] == "chat"
    bundle = ModelBundle.load(chat)
    assert raw["metrics"]["per_prompt"][0]["prompt_tokens"] == len(bundle.encode(PROMPTS[0]))
    assert default["metrics"]["per_prompt"][0]["prompt_tokens"] == len(
        PromptFormat(bundle).encode(PROMPTS[0])
    )


# --- the reference and the report --------------------------------------------------------------


def test_reference_refuses_the_other_format(chat, plain, tmp_path):
    path = tmp_path / "baseline.safetensors"
    run_real_model(chat, PROMPTS, "exact", max_new_tokens=4, reference_out=path)
    read = run_real_model(chat, PROMPTS, "compare", THREE_BIT, max_new_tokens=4, reference=path)
    assert read["config"]["exact_runs"] == "read from the reference"
    with pytest.raises(ReferenceError, match="prompt_format='chat', this job needs prompt_format='raw'"):
        run_real_model(
            chat, PROMPTS, "compare", THREE_BIT, max_new_tokens=4, reference=path, prompt_format="raw"
        )
    # Without a template, "chat" falls back to raw: the formats used agree, the prompts too.
    plain_path = tmp_path / "plain.safetensors"
    run_real_model(plain, PROMPTS, "exact", max_new_tokens=4, reference_out=plain_path)
    record = run_real_model(
        plain, PROMPTS, "compare", THREE_BIT, max_new_tokens=4, reference=plain_path, prompt_format="raw"
    )
    assert record["config"]["prompt_format"] == "raw"


def test_report_shows_scored_tokens_and_flags_few(chat, ends_at_once, tmp_path):
    records = [
        run_real_model(ModelSource(chat, name="tiny-chat"), PROMPTS, "compare", THREE_BIT, max_new_tokens=8),
        run_real_model(
            ModelSource(ends_at_once, name="tiny-eos"), PROMPTS, "compare", THREE_BIT, max_new_tokens=8
        ),
    ]
    markdown = write_report(summary_table(records), tmp_path / "report.md").read_text()
    start = markdown.index("## 2b.")
    section = markdown[start : markdown.find("\n## ", start + 1)]
    assert "| scored tokens |" in section
    assert records[1]["metrics"]["scored_tokens"] == 2
    if records[0]["metrics"]["scored_tokens"] >= 8:
        assert "tiny-chat (" not in section
    assert "**Few scored tokens.**" in section
    assert "tiny-eos (2 of 16 tokens, 2 prompts ended at once)" in section
    for record in records:
        assert f"| {record['metrics']['scored_tokens']} |" in section
