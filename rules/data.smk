# Deterministic dummy wavs and NeMo-style manifests from config["data"].


rule make_data:
    input:
        script="scripts/make_data.py",
        code=DATA_LIBRARY,
        env=env_ready("align"),
    output:
        **MANIFESTS,
    log:
        "results/logs/make_data.log",
    benchmark:
        "results/benchmarks/make_data.tsv"
    localrule: True
    conda:
        "../envs/align.yaml"
    params:
        python=interpreter("align"),
        data=json.dumps(config["data"], sort_keys=True),
        out=lambda w, output: Path(output.train).parent,
    shell:
        "exec {params.python} {input.script} --data {params.data:q} --out {params.out} > {log} 2>&1"
