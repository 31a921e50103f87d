"""The ``tq`` command.

tq bench --workload synthetic --dim 128 --bits 4 --strategy mse --n 65536 --json out.json
tq bench --workload trace --trace trace.safetensors --bits 3 --strategy mse --json out.json
tq bench --workload needle --real-model-dir DIR --bits 3 --context-lengths 1024,2048 --json out.json
tq trace export --model-dir DIR --prompts prompts.txt --layers 0,15 --heads 0,1 --out traces/
tq model prepare --preset smollm2-135m-instruct --out bundles/smollm2
"""

from __future__ import annotations

import argparse

from tq.cli.bench import add_bench_parser
from tq.cli.commands import add_model_parser, add_trace_parser


def build_parser() -> argparse.ArgumentParser:
    """The ``tq`` command's parser: subcommands ``bench``, ``trace`` and ``model``."""
    parser = argparse.ArgumentParser(prog="tq", description="TurboQuant KV-cache quantization tools")
    commands = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(commands)
    add_trace_parser(commands)
    add_model_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``tq`` command on ``argv`` (default: the process's); its exit status."""
    args = build_parser().parse_args(argv)
    return args.handler(args)
