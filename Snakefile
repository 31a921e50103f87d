# tq: the TurboQuant KV-cache evaluation sweep (docs/design.md section 8).
#   snakemake --cores all                               # the default sweep (config.yaml)
#   snakemake --cores all --configfile config/quick.yaml   # tiny models, about a minute
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.yaml", set_default=True)


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/corpus.smk"
include: "workflow/rules/traces.smk"
include: "workflow/rules/synthetic.smk"
include: "workflow/rules/evals.smk"
include: "workflow/rules/key_stats.smk"
include: "workflow/rules/report.smk"


# The report, and everything it is made from by name: a record or a table that was deleted (or
# removed after a failed job) is rebuilt by the next run even while report.md exists.
rule all:
    input:
        "results/report.md",
        rules.aggregate.output,
        all_records,
    default_target: True
