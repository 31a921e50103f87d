"""The ``tq`` command.

tq bench --workload synthetic --dim 128 --bits 4 --strategy mse --n 65536 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys

from tq.bench.synthetic import STRATEGIES, run_synthetic
from tq.records import write_record
from tq.rotation import ROTATION_KINDS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tq", description="TurboQuant KV-cache quantization tools")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_bench_parser(commands)
    return parser


def _add_bench_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="run a benchmark workload and write one result record")
    bench.set_defaults(handler=_bench)
    bench.add_argument("--workload", choices=["synthetic"], default="synthetic")
    bench.add_argument("--dim", type=int, default=128, help="vector dimension d (default 128)")
    bench.add_argument("--bits", type=int, default=4, help="bits per coordinate b (default 4)")
    bench.add_argument("--strategy", choices=STRATEGIES, default="mse")
    bench.add_argument("--n", type=int, default=65536, help="number of vectors (default 65536)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--rotation", choices=ROTATION_KINDS, default="haar")
    bench.add_argument("--repeats", type=int, default=5, help="timed runs per operation (>= 5)")
    bench.add_argument("--quick", action="store_true", help="cap n at a few thousand vectors")
    bench.add_argument("--json", metavar="PATH", help="write the result record here (atomically)")


def _summary(record: dict) -> str:
    config, metrics, timing = record["config"], record["metrics"], record["timing"]
    return "\n".join(
        [
            f"source={record['source']} d={config['dim']} b={config['bits']} strategy={config['strategy']} "
            f"n={config['n']} rotation={config['rotation']} threads={record['env']['threads']}",
            f"  D_mse {metrics['d_mse']:.5f}  ip_mse {metrics['ip_mse']:.3e}"
            f"  ip_bias {metrics['ip_bias']:+.2e}  ip_slope {metrics['ip_slope']:.4f}"
            f"  bits/vector {metrics['bits_per_vector']:.0f}",
            f"  quantize {timing['quantize_vectors_per_s'] / 1e6:.2f} M vectors/s"
            f"  dequantize {timing['dequantize_vectors_per_s'] / 1e6:.2f} M vectors/s"
            f"  inner products {timing['inner_product_pairs_per_s'] / 1e6:.1f} M pairs/s",
        ]
    )


def _bench(args: argparse.Namespace) -> int:
    try:
        record = run_synthetic(
            dim=args.dim,
            bits=args.bits,
            strategy=args.strategy,
            n=args.n,
            seed=args.seed,
            rotation=args.rotation,
            repeats=args.repeats,
            quick=args.quick,
        )
    except (ValueError, TypeError) as error:
        print(f"tq bench: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        write_record(args.json, record)
    print(_summary(record), flush=True)
    if not args.json:
        print(json.dumps(record, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
