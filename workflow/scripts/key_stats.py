"""Per-layer statistics of a model's cached keys and values (tq.tasks.key_stats.model_key_statistics):
offset share and channel imbalance, on windows drawn across the Wikipedia articles."""

import sys

from tq.tasks.key_stats import model_key_statistics
from tq.tasks.records import write_record


def _summary(stats: dict) -> str:
    """``share 0.981, rms ratio 45.2`` (``-`` for a statistic that is None)."""
    share, ratio = stats["mean_energy_share"], stats["channel_rms_ratio"]
    share_text = "-" if share is None else f"{share:.3f}"
    ratio_text = "-" if ratio is None else f"{ratio:.1f}"
    return f"share {share_text}, rms ratio {ratio_text}"


with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    import torch

    torch.set_num_threads(snakemake.threads)
    params = snakemake.params
    record = model_key_statistics(
        snakemake.input.model,
        windows=params.windows,
        window=params.window,
        sample_seed=params.sample_seed,
        model_name=snakemake.wildcards.model,
        corpus_file=snakemake.input.corpus,
    )
    write_record(snakemake.output[0], record)
    for entry in record["layers"]:
        print(
            f"layer {entry['layer']}: keys {_summary(entry['key'])}; values {_summary(entry['value'])}",
            file=log,
        )
