# nest-align: layer-by-layer, step-by-step numerical alignment of NeMo's NEST and its port.
# Run `snakemake -j2` (venvs under .venvs/) or `snakemake --use-conda -j2`; see README.md.

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "config/config.schema.yaml")


include: "rules/common.smk"
include: "rules/envs.smk"
include: "rules/data.smk"
include: "rules/validate.smk"
include: "rules/capture.smk"
include: "rules/compare.smk"


# The light jobs (env builds, data, summary, report) run where Snakemake runs, also on a cluster.
localrules:
    all,


rule all:
    default_target: True
    input:
        all_comparisons if FINGERPRINT else all_comparisons(),
        fingerprint_results(),
        "results/summary.tsv",
        "results/summary.md",
        "results/report.html",
