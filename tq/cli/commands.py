"""``tq trace export`` (per-head KV traces of a checkpoint) and ``tq model prepare`` (an ONNX
bundle of a preset or a checkpoint)."""

from __future__ import annotations

import argparse
import sys

from tq.cli.arguments import index_list
from tq.models.bundle import BundleError
from tq.models.errors import PrepareError
from tq.models.prepare import prepare_bundle
from tq.models.presets import DEFAULT_PRESET, PRESETS
from tq.tasks.trace_export import DEFAULT_QUERIES_PER_SAMPLE, TraceExportError, export_traces, read_prompts


def add_trace_parser(commands: argparse._SubParsersAction) -> None:
    trace = commands.add_parser("trace", help="per-head KV traces")
    actions = trace.add_subparsers(dest="trace_command", required=True)
    export = actions.add_parser(
        "export",
        help="run prompts through a Hugging Face model and write one trace file per (layer, KV head)",
        description="Every prompt is truncated to the shortest prompt's token count (or --max-seq if "
        "smaller); queries are the last --queries-per-sample positions of the first query head "
        "of each KV head's group.",
    )
    export.set_defaults(handler=_trace_export)
    export.add_argument("--model-dir", required=True, help="Hugging Face model directory")
    export.add_argument("--prompts", required=True, help=".txt (a prompt a line) or .jsonl")
    export.add_argument("--layers", required=True, type=index_list, help="layers, e.g. 0,15")
    export.add_argument("--heads", required=True, type=index_list, help="KV heads, e.g. 0,1")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--max-seq", type=int, help="at most this many tokens per prompt")
    export.add_argument(
        "--queries-per-sample",
        type=int,
        default=DEFAULT_QUERIES_PER_SAMPLE,
        help=f"queries per prompt, at its last positions (default {DEFAULT_QUERIES_PER_SAMPLE})",
    )
    export.add_argument("--model-name", help="the traces' model name (default: the directory's name)")


def _trace_export(args: argparse.Namespace) -> int:
    try:
        paths = export_traces(
            args.model_dir,
            read_prompts(args.prompts),
            args.layers,
            args.heads,
            args.out,
            max_seq=args.max_seq,
            queries_per_sample=args.queries_per_sample,
            model_name=args.model_name,
        )
    except TraceExportError as error:
        print(f"tq trace export: error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def add_model_parser(commands: argparse._SubParsersAction) -> None:
    model = commands.add_parser("model", help="real models: prepare ONNX bundles")
    actions = model.add_subparsers(dest="model_command", required=True)
    presets = "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items())
    prepare = actions.add_parser(
        "prepare",
        help="fetch or build a model, convert it to float32 and export an ONNX bundle",
        description="Writes model.onnx (+ model.onnx_data), tokenizer.json, config.json, "
        "generation_config.json and bundle.json into --out (default: $TQ_CACHE_DIR/bundles/PRESET). "
        f"A bundle prepared from the same inputs is reused. Presets: {presets}.",
    )
    prepare.set_defaults(handler=_model_prepare)
    prepare.add_argument("--preset", choices=list(PRESETS), help=f"a preset (default {DEFAULT_PRESET})")
    prepare.add_argument("--model-dir", help="a local Hugging Face checkpoint directory")
    prepare.add_argument("--out", help="bundle directory")
    prepare.add_argument("--threads", type=int, help="torch and ONNX Runtime threads")


def _model_prepare(args: argparse.Namespace) -> int:
    try:
        path = prepare_bundle(args.preset, args.model_dir, args.out, threads=args.threads)
    except (PrepareError, BundleError) as error:
        print(f"tq model prepare: error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0
