"""Render docs/measurements.md from the benchmark results in benchmarks/results/*.json.

    .venv/bin/python benchmarks/measurements_page.py            # write docs/measurements.md
    .venv/bin/python benchmarks/measurements_page.py --check    # exit 1 if the page is stale

The page is the one place that shows measured times and figures. Each section comes from one
JSON file and states the date (the file's ``created``) and the machine (its ``env`` or
``cluster``) the JSON records; a file that records no date says so. A results file whose
``benchmark`` has no renderer here is shown as a plain list of its top-level values, so a new
benchmark appears on the page (and the page test fails until the page is rendered again).
tests/test_docs.py holds the committed page to what this script renders.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "measurements.md"

Result = dict[str, Any]


def _decimals(value: float, digits: int) -> int:
    """Decimal places that show ``digits`` significant digits of ``value``."""
    return max(0, digits - 1 - math.floor(math.log10(abs(value))))


def number(value: Any, digits: int = 3) -> str:
    """A measured number with ``digits`` significant digits (at least its integer part); integers,
    flags and strings as they are."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{_decimals(value, digits) if value else 0}f}"
    return str(value)


def plus_minus(mean: float | None, se: float | None, digits: int = 3) -> str:
    """``mean ± se``: the standard error to two significant digits, the mean to the same decimals
    (or ``digits`` significant digits without an error)."""
    if mean is None:
        return "-"
    if not se:
        return number(mean, digits)
    decimals = _decimals(se, 2)
    return f"{mean:.{decimals}f} ± {se:.{decimals}f}"


def megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def provenance(result: Result, name: str) -> list[str]:
    """Where a section's figures come from: file, date and machine as the JSON records them."""
    date = result.get("created") or "not recorded in the file"
    env = result.get("env")
    if env:
        gpu = env.get("gpu") or "none"
        machine = (
            f"{env.get('cpu', '?')}, {env.get('cpu_count', '?')} CPUs, {env.get('threads', '?')} threads, "
            f"GPU {gpu}; tq {env.get('tq', '?')}, Python {env.get('python', '?')}, NumPy "
            f"{env.get('numpy', '?')}, Numba {env.get('numba', '?')}"
        )
    elif "cluster" in result:
        machine = f"a SLURM cluster of {result['cluster']}"
    else:
        machine = "not recorded in the file"
    return [f"Source: `benchmarks/results/{name}`. Date: {date}. Machine: {machine}.", ""]


def cache_words(cache: Result) -> str:
    """A cache setting as words: "3-bit MSE keys and values"."""
    keys = f"{number(cache['key_bits'])}-bit {cache['key_strategy'].upper()} keys"
    values = f"{number(cache['value_bits'])}-bit {cache['value_strategy'].upper()} values"
    same = cache["key_bits"] == cache["value_bits"] and cache["key_strategy"] == cache["value_strategy"]
    return keys.replace(" keys", " keys and values") if same else f"{keys}, {values}"


def shape_words(result: Result) -> str:
    return f"{result['windows']} windows x {result['window']} tokens, context {result['context']}"


# ------------------------------------------------------------------------------------ sections


def perplexity_decode(result: Result) -> list[str]:
    one, batched = result["one_sequence_path"], result["batched_path"]
    lines = [
        f"One decode-protocol perplexity job on {result['model']} ({shape_words(result)}, "
        f"{result['scored_tokens']} scored tokens, {cache_words(result['cache'])}), along the path "
        "that ran one sequence per ONNX Runtime call and re-ran the exact model inside the job, and "
        "along the path with the exact reference computed once and the windows decoded together.",
        "",
    ]
    lines += table(
        ["path", "seconds", "scored tokens/s", "perplexity ratio"],
        [
            ["one sequence per call", number(one["seconds"]), number(one["scored_tokens_per_s"]),
             number(one["perplexity_ratio"], 5)],
            ["exact reference, once", number(batched["reference_seconds"]), "", ""],
            [f"batched (batch {batched['batch']}), reading the reference",
             number(batched["seconds_reading_reference"]),
             number(batched["scored_tokens_per_s_reading_reference"]),
             plus_minus(batched["perplexity_ratio"], batched["perplexity_ratio_se"])],
        ],
    )  # fmt: skip
    lines += [
        "Speed-up per cache setting once the reference exists: "
        f"{number(result['speedup_reading_reference'])}x; "
        f"including the reference: {number(result['speedup_with_reference'])}x. The two paths' "
        f"ratios agree: {number(result['ratios_agree'])}.",
        "",
        "Decode throughput by batch size (windows decoded per call):",
        "",
    ]
    sweep = result["batch_sweep"]
    lines += table(
        ["batch", *(str(row["batch"]) for row in sweep)],
        [["decode tokens/s", *(number(row["decode_tokens_per_s"]) for row in sweep)]],
    )
    return lines


def _window_rows(label: str, shape: Result) -> list[list[str]]:
    rows = []
    for name in sorted(key for key in shape if isinstance(shape[key], dict)):
        figures = shape[name]
        if "perplexity_ratio" not in figures:
            continue
        rows.append(
            [
                label, name, number(figures["job_seconds"]),
                f"{plus_minus(figures['perplexity_ratio'], figures['perplexity_ratio_se'])} "
                f"({number(figures['perplexity_ratio_se_token'], 2)})",
                f"{plus_minus(figures['kl_divergence'], figures['kl_divergence_se'])} "
                f"({number(figures['kl_divergence_se_token'], 2)})",
                plus_minus(figures["top1_agreement"], figures["top1_agreement_se"]),
            ]
        )  # fmt: skip
    return rows


def perplexity_windows(result: Result) -> list[str]:
    lines = [
        "What a perplexity window shape costs and how sure its figures are: SmolLM2-135M-Instruct, "
        f"{result['protocol']} protocol, {result['threads']} threads; TurboQuant MSE keys and values "
        "at 2 bits (`mse2`) and 3 bits (`mse3`). ± is the window-level standard error; the per-token "
        "standard error is in parentheses.",
        "",
    ]
    shapes = {
        f"{shape['windows']} x {shape['window']}, context {shape['context']} (seed {shape['sample_seed']})": (
            shape
        )
        for shape in result["perplexity"].values()
    }
    second = result.get("second_window_set")
    if second:
        shapes[
            f"{second['windows']} x {second['window']}, context {second['context']} "
            f"(seed {second['sample_seed']}, other articles)"
        ] = second
    lines += table(
        ["windows", "setting", "job seconds", "perplexity ratio", "KL (nats)", "top-1 agreement"],
        [row for label, shape in shapes.items() for row in _window_rows(label, shape)],
    )
    lines += table(
        ["windows", "articles", "exact reference seconds"],
        [
            [label, len(shape["articles"]), number(shape["reference_seconds"])]
            for label, shape in shapes.items()
        ],
    )
    agreement = result.get("agreement", {})
    if agreement:
        lines += [
            "Do the two window sets agree within their 95% intervals? "
            + "; ".join(
                f"{name}: by the window-level SE {number(flags['window_se'])}, by the per-token SE "
                f"{number(flags['token_se'])}"
                for name, flags in sorted(agreement.items())
            )
            + ".",
            "",
        ]
    layers = result.get("layer_sensitivity", {})
    if layers:
        lines += ["Per-layer sensitivity shapes (one layer quantized):", ""]
        lines += table(
            ["windows", "setting", "job seconds", "perplexity ratio", "KL (nats)", "top-1 agreement"],
            [
                row
                for shape in layers.values()
                for row in _window_rows(
                    f"{shape['windows']} x {shape['window']}, context {shape['context']}", shape
                )
            ],
        )
    return lines


def engines_perplexity(result: Result) -> list[str]:
    engines = [name for name in ("onnxruntime", "transformers") if name in result]
    lines = [
        f"One decode-protocol perplexity job on SmolLM2-135M-Instruct through each engine "
        f"({shape_words(result)}, {cache_words(result['cache'])}, {result['threads']} threads).",
        "",
    ]
    lines += table(
        ["engine", "device, dtype", "exact reference s", "job s", "scored tokens/s", "perplexity ratio"],
        [
            [
                name, f"{result[name]['device']}, {result[name]['dtype']}",
                number(result[name]["reference_seconds"]), number(result[name]["job_seconds"]),
                number(result[name]["scored_tokens_per_s"]),
                plus_minus(result[name]["perplexity_ratio"], result[name]["perplexity_ratio_se"]),
            ]
            for name in engines
        ],
    )  # fmt: skip
    lines += [f"Job time, transformers over ONNX Runtime: {number(result['job_seconds_ratio'])}x.", ""]
    return lines


def transformers_decode(result: Result) -> list[str]:
    paths = [name for name in ("reconstruct", "packed") if name in result]
    lines = [
        f"Greedy decoding of {result['steps']} tokens after a {result['context']}-token prefill on "
        f"SmolLM2-135M-Instruct through transformers with a TurboQuantCache "
        f"({cache_words(result['cache'])}): attention over the kept reconstruction "
        '(`reconstruct`) against attention from the packed codes (`packed`). "held" counts every '
        "tensor of the cache as allocated.",
        "",
    ]
    lines += table(
        ["path", "attention", "prefill s", "decode tokens/s", "stored", "buffers", "held",
         "fp32 keys and values", "host-device bytes a step"],
        [
            [
                name, f"`{result[name]['attention']}`", number(result[name]["prefill_seconds"]),
                number(result[name]["decode_tokens_per_s"]),
                megabytes(result[name]["memory"]["stored_bytes"]),
                megabytes(result[name]["memory"]["buffer_bytes"]),
                megabytes(result[name]["memory"]["held_bytes"]),
                megabytes(result[name]["memory"]["fp32_bytes"]),
                number(result[name].get("host_device_bytes_per_step")),
            ]
            for name in paths
        ],
    )  # fmt: skip
    lines += [
        f"Held bytes, reconstruct over packed: {number(result['held_bytes_ratio'])}x; decode speed, "
        f"packed over reconstruct: {number(result['packed_speed_ratio'])}x. The two paths share their "
        f"first {result['tokens_agree_prefix']} of {result['steps']} greedy tokens (float32 rounding "
        "differs, so they part at a near-tie).",
        "",
    ]
    return lines


def slurm_walltime(result: Result) -> list[str]:
    lines = [
        f"The quick sweep (`{result['configfile']}`, {result['jobs']} jobs) run locally and submitted "
        "to a one-node SLURM cluster through profiles/slurm, with and without job grouping, one "
        "after the other from empty results directories.",
        "",
    ]
    rows = [["local", "-", number(result["local_seconds"]), "1"]]
    rows.append(
        [
            "SLURM, grouped",
            str(result["slurm_jobs"]),
            number(result["slurm_seconds"]),
            number(result["ratio"]),
        ]
    )
    ungrouped = result.get("ungrouped")
    if ungrouped:
        rows.append(
            ["SLURM, ungrouped", str(ungrouped["slurm_jobs"]), number(ungrouped["slurm_seconds"]),
             number(ungrouped["ratio"])]
        )  # fmt: skip
    return lines + table(["run", "SLURM jobs", "wall seconds", "over local"], rows)


def generic(result: Result) -> list[str]:
    """Any other results file: its top-level numbers, strings and flags."""
    rows = [
        [f"`{key}`", number(value)]
        for key, value in result.items()
        if isinstance(value, (int, float, str, bool)) and key not in ("created",)
    ]
    return table(["field", "value"], rows)


SECTIONS: dict[str, tuple[str, Callable[[Result], list[str]], str]] = {
    "perplexity_decode": (
        "Perplexity job: shared exact reference and batched decoding",
        perplexity_decode,
        "benchmarks/perplexity_decode.py",
    ),
    "perplexity_windows": (
        "Perplexity window shapes: cost and certainty",
        perplexity_windows,
        "benchmarks/perplexity_windows.py",
    ),
    "engines_perplexity": (
        "ONNX Runtime and transformers engines",
        engines_perplexity,
        "benchmarks/engines_perplexity.py",
    ),
    "transformers_decode": (
        "Decoding through transformers: reconstruction vs packed codes",
        transformers_decode,
        "benchmarks/transformers_decode.py",
    ),
    "slurm_walltime": (
        "SLURM submission against a local run",
        slurm_walltime,
        "benchmarks/slurm_walltime.py",
    ),
}


def render(results: Path = RESULTS) -> str:
    """The page, from every ``*.json`` in ``results`` (sorted by file name)."""
    files = sorted(results.glob("*.json"))
    loaded = [(path.name, json.loads(path.read_text())) for path in files]
    dates = sorted(result["created"] for _, result in loaded if result.get("created"))
    lines = [
        "# Measurements",
        "",
        "<!-- Generated by benchmarks/measurements_page.py from benchmarks/results/*.json: do not edit. -->",
        "",
        "Every measured time and figure the documentation relies on, each with the date and machine its "
        "results file records. Re-run a benchmark (the command under each heading), then render this "
        "page again: `.venv/bin/python benchmarks/measurements_page.py`. `tests/test_docs.py` fails "
        "while the page and the results differ.",
        "",
        f"Latest recorded date: {dates[-1] if dates else 'none recorded'}. "
        f"Results files: {len(loaded)}, of which {len(dates)} record their date.",
        "",
    ]
    for name, result in loaded:
        benchmark = result.get("benchmark", Path(name).stem)
        title, write, script = SECTIONS.get(benchmark, (benchmark, generic, None))
        lines += [f"## {title}", ""]
        if script:
            lines += [f"Measured by `.venv/bin/python {script} --json benchmarks/results/{name}`.", ""]
        lines += provenance(result, name)
        lines += write(result)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/measurements.md is stale")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results directory")
    parser.add_argument("--out", type=Path, default=PAGE, help="the page to write")
    args = parser.parse_args(argv)
    page = render(args.results)
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != page:
            print(f"{args.out} is stale: run {Path(__file__).relative_to(ROOT)}", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
