"""``tq bench``: run one evaluation task (a workload of :data:`tq.tasks.registry.CLI_TASKS`) and
write its record."""

from __future__ import annotations

import argparse
import json
import math
import sys

from tq.cache.config import FP8_SCALES, NORM_DTYPES, CacheConfig
from tq.cache.presets import CACHE_PRESETS, expand_preset
from tq.cache.strategies import STRATEGY_NAMES
from tq.cli.arguments import fraction_list, index_list, layer_list, output_path, positive_int
from tq.core.rotation import ROTATION_KINDS
from tq.kernels import DEVICES, DeviceUnavailableError
from tq.models.chat import PROMPT_FORMATS
from tq.pipeline.checks import cache_fields, exact_layer_arguments
from tq.tasks.attention import run_attention
from tq.tasks.compare import DEFAULT_TOP_K as REAL_TOP_K
from tq.tasks.compare import MODES, run_real_model
from tq.tasks.needle import (
    DEFAULT_CONTEXT_LENGTHS,
    DEFAULT_DEPTHS,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TRIALS,
    run_needle,
)
from tq.tasks.perplexity import DEFAULT_BATCH, DEFAULT_SAMPLE_SEED, PROTOCOLS, run_perplexity
from tq.tasks.records import write_record
from tq.tasks.registry import CLI_TASKS
from tq.tasks.synthetic import run_synthetic
from tq.tasks.trace_eval import DEFAULT_TOP_K as TRACE_TOP_K
from tq.tasks.trace_eval import run_trace
from tq.tasks.trace_export import read_prompts


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
        help="run a benchmark workload and write one result record",
        description="synthetic: random unit vectors (--dim, --n, --repeats, --quick); "
        "trace: attention on a KvTrace file (--trace, --value-bits, --value-strategy, "
        "--residual-length, --top-k, --renormalize, --norm-dtype); real-model, perplexity, needle: "
        "a model bundle (--real-model-dir) with the cache options.",
    )
    bench.set_defaults(handler=_bench)
    bench.add_argument(
        "--workload",
        choices=CLI_TASKS,
        default="synthetic",
    )
    bench.add_argument("--bits", type=float, default=4, help="(key) bits per coordinate (default 4)")
    bench.add_argument(
        "--strategy",
        "--real-key-strategy",
        dest="strategy",
        choices=STRATEGY_NAMES,
        default="mse",
        help="(key) strategy",
    )
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--rotation", choices=ROTATION_KINDS, default="haar")
    bench.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where quantization and attention run (auto: a GPU if present)",
    )
    bench.add_argument(
        "--json",
        metavar="PATH",
        type=output_path,
        help="write the result record here (atomically; checked before the run starts)",
    )
    synthetic = bench.add_argument_group("synthetic workload")
    synthetic.add_argument("--dim", type=int, default=128, help="vector dimension d (default 128)")
    synthetic.add_argument("--n", type=int, default=65536, help="number of vectors (default 65536)")
    synthetic.add_argument("--repeats", type=int, default=5, help="timed runs per operation (>= 5)")
    synthetic.add_argument("--quick", action="store_true", help="cap n at a few thousand vectors")
    attention = bench.add_argument_group("attention workload (also --dim, --bits, --strategy, --repeats)")
    attention.add_argument("--kv-heads", type=int, default=8, help="KV heads of the cache (default 8)")
    attention.add_argument("--q-heads", type=int, default=32, help="query heads, a multiple of --kv-heads")
    trace = bench.add_argument_group("trace workload")
    trace.add_argument("--trace", metavar="PATH", help="a KvTrace safetensors file")
    cache = bench.add_argument_group("cache options (trace, real-model, perplexity, needle)")
    cache.add_argument("--value-bits", type=float, help="value bits per coordinate (default: --bits)")
    cache.add_argument(
        "--value-strategy",
        "--real-value-strategy",
        dest="value_strategy",
        choices=STRATEGY_NAMES,
        help="value strategy (default: --strategy)",
    )
    # The options below default to None: unset, they take their default, or their preset's value.
    cache.add_argument("--residual-length", type=int, help="recent tokens kept exact (default 0)")
    cache.add_argument("--group-size", type=int, help="baselines: values sharing one scale (default 32)")
    cache.add_argument(
        "--renormalize", action="store_true", default=None, help="rescale reconstructions to their norms"
    )
    cache.add_argument("--norm-dtype", choices=NORM_DTYPES, help="norms stored as (default float32)")
    cache.add_argument(
        "--center-keys",
        action="store_true",
        default=None,
        help="subtract each head's mean key (from the prefill, stored fp32) before quantizing keys",
    )
    cache.add_argument(
        "--fp8-scale",
        choices=FP8_SCALES,
        help="fp8 strategy: a float16 scale per token (default) or one fp32 scale per head",
    )
    cache.add_argument(
        "--cache-preset",
        choices=list(CACHE_PRESETS),
        help="a named setting (vLLM's TurboQuant presets): its bits, strategies, options and exact "
        "layers; cache options given besides it override the preset's (--bits, --strategy, "
        "--rotation and --seed only where they differ from their defaults)",
    )
    cache.add_argument(
        "--top-k",
        type=positive_int,
        help=f"trace: top-k overlap (default {TRACE_TOP_K}); real-model: top-k agreement "
        f"(default {REAL_TOP_K})",
    )
    real = bench.add_argument_group("real-model, perplexity and needle workloads")
    real.add_argument("--real-model-dir", metavar="DIR", help="a model bundle (tq model prepare)")
    real.add_argument("--prompt", help="one prompt")
    real.add_argument("--prompts", metavar="FILE", help="prompts: .txt (one a line) or .jsonl (prompt field)")
    real.add_argument("--real-eval-mode", choices=MODES, default="compare")
    real.add_argument(
        "--prompt-format",
        choices=PROMPT_FORMATS,
        default="chat",
        help="real-model: chat (default): each prompt as one user turn of the model's chat "
        "template (raw text for a model without one); raw: the text as it is",
    )
    real.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"longest answer in tokens (default 16; needle: {DEFAULT_MAX_NEW_TOKENS})",
    )
    real.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ORT's)")
    real.add_argument("--exact-first-layers", type=int, help="layers kept exact at the start (default 0)")
    real.add_argument("--exact-last-layers", type=int, help="layers kept exact at the end (default 0)")
    real.add_argument(
        "--exact-layers",
        type=layer_list,
        metavar="L,L,...",
        help="any layers kept exact, comma-separated (e.g. 0,1,2,4,8)",
    )
    real.add_argument("--windows", type=int, default=4, help="perplexity: number of text windows")
    real.add_argument(
        "--sample-seed",
        type=int,
        default=DEFAULT_SAMPLE_SEED,
        help="perplexity: the seed the windows are drawn from, across the corpus's articles "
        f"(default {DEFAULT_SAMPLE_SEED})",
    )
    real.add_argument("--window", type=int, default=1024, help="perplexity: tokens per window")
    real.add_argument(
        "--context",
        type=int,
        help="perplexity: context tokens per window (default 512); attention: cached tokens (default 32768)",
    )
    real.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="decode",
        help="perplexity: decode the continuation token by token, each token quantized as it enters "
        "(decode, default), or score it in one call against a quantized context (window)",
    )
    real.add_argument(
        "--batch",
        type=int,
        default=DEFAULT_BATCH,
        help=f"perplexity: windows decoded per ONNX Runtime call (default {DEFAULT_BATCH}; 1: one at a time)",
    )
    needle = bench.add_argument_group(
        "needle workload",
        "a secret number hidden in Wikipedia text at each depth, asked for after it; retrieval "
        "with the exact and the quantized cache (--seed also draws the needles and the text)",
    )
    needle.add_argument(
        "--context-lengths",
        type=index_list,
        default=list(DEFAULT_CONTEXT_LENGTHS),
        metavar="N,N,...",
        help=f"prompt lengths in tokens (default {','.join(map(str, DEFAULT_CONTEXT_LENGTHS))})",
    )
    needle.add_argument(
        "--depths",
        type=fraction_list,
        default=list(DEFAULT_DEPTHS),
        metavar="F,F,...",
        help="needle depths, fractions in (0, 1) of the filler before the needle "
        f"(default {','.join(map(str, DEFAULT_DEPTHS))})",
    )
    needle.add_argument(
        "--trials",
        type=int,
        default=DEFAULT_TRIALS,
        help=f"prompts per length and depth (default {DEFAULT_TRIALS})",
    )


def _pm(metrics: dict, name: str, spec: str) -> str:
    """``metrics[name]`` as "value ± SE" (the SE from ``<name>_se`` when the record has one)."""
    se = metrics.get(f"{name}_se")
    return f"{metrics[name]:{spec}}" + ("" if se is None else f" ± {se:{spec}}")


def _summary(record: dict) -> str:
    config, metrics, timing = record["config"], record["metrics"], record["timing"]
    if config["workload"] == "perplexity":
        return (
            f"source=real-model perplexity {config['model']} windows={config['windows']}x{config['window']} "
            f"context={config['context']} protocol={config['protocol']}"
            f"\n  perplexity exact {metrics['exact_perplexity']:.3f}  quantized "
            f"{metrics['quantized_perplexity']:.3f}  ratio {_pm(metrics, 'perplexity_ratio', '.4f')}"
            f"  KL {_pm(metrics, 'kl_divergence', '.4g')}  top-1 {_pm(metrics, 'top1_agreement', '.4f')}"
            f"  ({metrics['scored_tokens']} tokens in {config['windows']} windows, seed "
            f"{config['sample_seed']}; ± one standard error over windows)"
            f"\n  {timing['scored_tokens_per_s']:.1f} scored tokens/s"
        )
    if config["workload"] == "needle":
        lines = [
            f"source=real-model needle {config['model']} lengths={config['context_lengths']} "
            f"depths={config['depths']} trials={config['trials']}",
            f"  retrieval exact {metrics['exact_retrieval']:.3f}  "
            f"quantized {metrics['quantized_retrieval']:.3f}"
            f"  same answer {metrics['answer_agreement']:.3f}  KV {metrics['kv_compression_ratio']:.2f}x"
            f"  {timing['seconds']:.0f} s",
        ]
        for length, rates in metrics["by_length"].items():
            lines.append(
                f"  {length} tokens: exact {rates['exact_retrieval']:.3f}  quantized "
                f"{rates['quantized_retrieval']:.3f}"
            )
        return "\n".join(lines)
    if config["workload"] == "real-model":
        lines = [
            f"source=real-model {config['model']} mode={config['mode']} prompts={config['prompts']} "
            f"format={config.get('prompt_format')}"
        ]
        if "exact_answer_tokens" in metrics:
            lines.append(
                f"  exact answers: {metrics['exact_answer_tokens']} of {metrics['possible_tokens']} "
                f"possible tokens, {metrics['prompts_ended_at_once']} ended at once"
            )
        lines += [f"  warning: {warning}" for warning in metrics.get("warnings", [])]
        for mode, speed in timing.items():
            decode = speed.get("decode_tokens_per_s")
            lines.append(
                f"  {mode}: prefill {speed.get('prefill_seconds_mean', math.nan) * 1e3:.1f} ms, "
                + (
                    f"decode {decode:.1f} tokens/s"
                    if decode is not None
                    else "decode speed: none (no decode step)"
                )
            )
        if config["mode"] == "compare":
            lines.append(
                f"  logit RMSE {metrics['logit_rmse']:.4f}  top-1 {metrics['top1_agreement']:.4f}  "
                f"top-{config['top_k']} {metrics['topk_agreement']:.4f}  "
                f"KL {_pm(metrics, 'kl_divergence', '.4g')}  "
                f"token match {metrics['token_match_rate']:.3f}  "
                f"KV {metrics['quantized_kv']['kv_compression_ratio']:.2f}x"
            )
        return "\n".join(lines)
    if config["workload"] == "attention":
        return (
            f"source={record['source']} attention context={config['context']} d={config['dim']} "
            f"bits={config['bits']} heads={config['q_heads']}q/{config['kv_heads']}kv"
            f" device={config['device']}"
            f"\n  packed {timing['seconds']['packed'] * 1e3:.2f} ms  {timing['baseline']} on the "
            f"reconstruction {timing['seconds']['float'] * 1e3:.2f} ms  speedup {timing['speedup']:.2f}x"
            f"\n  bytes read {metrics['bytes_read_packed'] / 1e6:.1f} MB vs "
            f"{metrics['bytes_read_baseline'] / 1e6:.1f} MB  relative error {metrics['relative_error']:.2e}"
        )
    if record["source"] == "trace":
        cache = config["cache"]
        return "\n".join(
            [
                f"source=trace {config['model']} layer={config['layer']} head={config['head']} "
                f"samples={config['samples']} seq={config['seq_len']} "
                f"keys={cache['key_strategy']}@{cache['key_bits']} "
                f"values={cache['value_strategy']}@{cache['value_bits']}",
                f"  score RMSE {metrics['score_rmse']:.4f} "
                f"({metrics['score_rmse_relative']:.3f} of the spread)"
                f"  softmax KL {metrics['softmax_kl']:.4g}  top-{config['top_k']} overlap "
                f"{metrics['topk_overlap']:.3f}  output error {metrics['output_relative_error']:.4f}"
                f"  compression {metrics['compression_ratio']:.2f}x",
            ]
        )
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


def _whole(bits: float) -> int | float:
    """An integer width as int (4.0 -> 4), a fractional one unchanged."""
    return int(bits) if float(bits).is_integer() else bits


# Options shared with the synthetic and attention workloads, which need a value: destination ->
# (cache field, default). At their default they do not override a --cache-preset.
_SHARED_CACHE_ARGUMENTS = {
    "bits": ("key_bits", 4),
    "strategy": ("key_strategy", "mse"),
    "seed": ("seed", 0),
    "rotation": ("rotation", "haar"),
    "device": ("device", "cpu"),
}
# Cache-only options (None when not given): destination -> (cache field, default).
_CACHE_ARGUMENTS = {
    "value_bits": ("value_bits", None),
    "value_strategy": ("value_strategy", None),
    "residual_length": ("residual_length", 0),
    "group_size": ("group_size", 32),
    "renormalize": ("renormalize", False),
    "norm_dtype": ("norm_dtype", "float32"),
    "center_keys": ("center_keys", False),
    "fp8_scale": ("fp8_scale", "token"),
    "exact_first_layers": ("exact_first_layers", 0),
    "exact_last_layers": ("exact_last_layers", 0),
    "exact_layers": ("exact_layers", []),
}


def _cache_settings(args: argparse.Namespace) -> dict:
    """The cache fields and exact layers the command line asks for: ``--cache-preset``'s, with
    every cache option given besides it over them; without a preset, every option at its value or
    default (the value bits and strategy default to the key's)."""
    shared = {field: getattr(args, dest) for dest, (field, _) in _SHARED_CACHE_ARGUMENTS.items()}
    own = {field: getattr(args, dest, None) for dest, (field, _) in _CACHE_ARGUMENTS.items()}
    own = {field: value for field, value in own.items() if value is not None}
    if args.cache_preset is not None:
        changed = {
            field: value
            for (field, default), value in zip(_SHARED_CACHE_ARGUMENTS.values(), shared.values(), strict=True)
            if value != default
        }
        return expand_preset({"preset": args.cache_preset, **changed, **own})
    defaults = {field: default for field, default in _CACHE_ARGUMENTS.values()}
    fields = defaults | shared | own
    fields["value_bits"] = fields["value_bits"] if fields["value_bits"] is not None else args.bits
    fields["value_strategy"] = fields["value_strategy"] or args.strategy
    return fields


def _cache_config(settings: dict) -> CacheConfig:
    """The CacheConfig of :func:`_cache_settings` (its exact layers apart)."""
    fields = cache_fields(settings)
    fields["key_bits"], fields["value_bits"] = _whole(fields["key_bits"]), _whole(fields["value_bits"])
    return CacheConfig(**fields)


def _max_new_tokens(args: argparse.Namespace, default: int) -> int:
    return default if args.max_new_tokens is None else args.max_new_tokens


def _real_model_inputs(args: argparse.Namespace) -> dict:
    if not args.real_model_dir:
        raise ValueError(f"the {args.workload} workload needs --real-model-dir DIR (see tq model prepare)")
    settings = _cache_settings(args)
    return {"config": _cache_config(settings), **exact_layer_arguments(settings), "threads": args.threads}


def _run_real_model(args: argparse.Namespace) -> dict:
    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("the real-model workload needs exactly one of --prompt TEXT or --prompts FILE")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    return run_real_model(
        args.real_model_dir,
        prompts,
        mode=args.real_eval_mode,
        prompt_format=args.prompt_format,
        max_new_tokens=_max_new_tokens(args, 16),
        top_k=REAL_TOP_K if args.top_k is None else args.top_k,
        **_real_model_inputs(args),
    )


def _run_perplexity(args: argparse.Namespace) -> dict:
    return run_perplexity(
        args.real_model_dir,
        windows=args.windows,
        window=args.window,
        context=512 if args.context is None else args.context,
        protocol=args.protocol,
        batch=args.batch,
        sample_seed=args.sample_seed,
        **_real_model_inputs(args),
    )


def _run_needle(args: argparse.Namespace) -> dict:
    return run_needle(
        args.real_model_dir,
        context_lengths=args.context_lengths,
        depths=args.depths,
        trials=args.trials,
        max_new_tokens=_max_new_tokens(args, DEFAULT_MAX_NEW_TOKENS),
        seed=args.seed,
        **_real_model_inputs(args),
    )


def _run_attention(args: argparse.Namespace) -> dict:
    return run_attention(
        context=32768 if args.context is None else args.context,
        dim=args.dim,
        bits=_whole(args.bits),
        kv_heads=args.kv_heads,
        q_heads=args.q_heads,
        strategy=args.strategy,
        repeats=args.repeats,
        seed=args.seed,
        device=args.device,
    )


def _run_trace(args: argparse.Namespace) -> dict:
    if not args.trace:
        raise ValueError("the trace workload needs --trace PATH")
    config = _cache_config(_cache_settings(args))
    return run_trace(args.trace, config, top_k=TRACE_TOP_K if args.top_k is None else args.top_k)


def _run_synthetic(args: argparse.Namespace) -> dict:
    if not float(args.bits).is_integer():
        raise ValueError(f"the synthetic workload needs whole --bits, got {args.bits}")
    return run_synthetic(
        dim=args.dim,
        bits=int(args.bits),
        strategy=args.strategy,
        n=args.n,
        seed=args.seed,
        rotation=args.rotation,
        repeats=args.repeats,
        quick=args.quick,
        device=args.device,
    )


# --workload NAME -> how the CLI runs it: one per task of tq.tasks.registry.CLI_TASKS (a test
# holds the two together).
WORKLOAD_RUNNERS = {
    "synthetic": _run_synthetic,
    "trace": _run_trace,
    "real-model": _run_real_model,
    "perplexity": _run_perplexity,
    "needle": _run_needle,
    "attention": _run_attention,
}


def _bench(args: argparse.Namespace) -> int:
    try:
        record = WORKLOAD_RUNNERS[args.workload](args)
    except (ValueError, TypeError, DeviceUnavailableError) as error:
        print(f"tq bench: error: {error}", file=sys.stderr)
        return 2
    print(_summary(record), flush=True)
    if args.json is None:
        print(json.dumps(record, indent=2))
        return 0
    try:
        write_record(args.json, record)
    except OSError as error:
        # The path was writable when the run started; keep the result rather than lose it.
        print(json.dumps(record, indent=2))
        print(
            f"tq bench: error: cannot write {args.json}: {error}; the record is printed above",
            file=sys.stderr,
        )
        return 1
    return 0
