# Fan-in: one comparison per (seed, step), then the summary table and the report.


rule compare:
    input:
        ref=full_files(REFERENCE),
        cand=full_files(CANDIDATE),
        script="scripts/compare.py",
        code=COMPARE_LIBRARY,
        name_map=[config["name_map"]] if config.get("name_map") else [],
        env=env_ready("align"),
    output:
        "results/compare/seed_{seed}/step_{step}.pkl",
    log:
        "results/logs/compare/seed_{seed}/step_{step}.log",
    benchmark:
        "results/benchmarks/compare/seed_{seed}/step_{step}.tsv"
    wildcard_constraints:
        seed=r"\d+",
        step=r"\d+",
    conda:
        "../envs/align.yaml"
    resources:
        mem_mb=COMPARE_MEM_MB,
        runtime=COMPARE_RUNTIME,
    params:
        python=interpreter("align"),
        ref=lambda w: full_dir(REFERENCE, w.seed, w.step),
        cand=lambda w: full_dir(CANDIDATE, w.seed, w.step),
        tolerance=tolerance_option(),
        name_map=f"--name-map {config['name_map']}" if config.get("name_map") else "",
    shell:
        "exec {params.python} {input.script} --ref {params.ref} --cand {params.cand}"
        " {params.tolerance} {params.name_map} --out {output} > {log} 2>&1"


# `isolation: {state: reference}`: each step's own error, the candidate's step started from the
# reference's state after the step before.
if STATE:

    use rule compare as compare_state with:
        input:
            ref=capture_files(REFERENCE),
            cand=state_files(),
            script="scripts/compare.py",
            code=COMPARE_LIBRARY,
            name_map=[config["name_map"]] if config.get("name_map") else [],
            env=env_ready("align"),
        output:
            "results/compare/state/seed_{seed}/step_{step}.pkl",
        log:
            "results/logs/compare/state/seed_{seed}/step_{step}.log",
        benchmark:
            "results/benchmarks/compare/state/seed_{seed}/step_{step}.tsv"
        params:
            python=interpreter("align"),
            ref=lambda w: step_dir(REFERENCE, w.seed, w.step),
            cand=lambda w: state_dir(w.seed, w.step),
            tolerance=tolerance_option(),
            name_map=(
                f"--name-map {config['name_map']}" if config.get("name_map") else ""
            ),


# `capture: {mode: fingerprint}`: one process per seed compares every step's fingerprints and
# names the step to capture again in full (a checkpoint: the DAG grows by that step's jobs).
if FINGERPRINT:

    checkpoint compare_fingerprints:
        input:
            ref=lambda w: [
                p for s in STEPS for p in capture_files(REFERENCE, w.seed, s)
            ],
            cand=lambda w: [
                p for s in STEPS for p in capture_files(CANDIDATE, w.seed, s)
            ],
            script="scripts/compare_fingerprints.py",
            code=FINGERPRINT_LIBRARY,
            name_map=[config["name_map"]] if config.get("name_map") else [],
            env=env_ready("align"),
        output:
            "results/fingerprints/seed_{seed}.json",
        log:
            "results/logs/fingerprints/seed_{seed}.log",
        benchmark:
            "results/benchmarks/fingerprints/seed_{seed}.tsv"
        wildcard_constraints:
            seed=r"\d+",
        conda:
            "../envs/align.yaml"
        resources:
            mem_mb=COMPARE_MEM_MB,
            runtime=COMPARE_RUNTIME,
        params:
            python=interpreter("align"),
            ref=lambda w: f"results/capture/{REFERENCE}/seed_{w.seed}",
            cand=lambda w: f"results/capture/{CANDIDATE}/seed_{w.seed}",
            steps=",".join(str(s) for s in STEPS),
            tolerance=tolerance_option(),
            name_map=(
                f"--name-map {config['name_map']}" if config.get("name_map") else ""
            ),
        shell:
            "exec {params.python} {input.script} --ref-run {params.ref}"
            " --cand-run {params.cand} --steps {params.steps} {params.tolerance}"
            " {params.name_map} --out {output} > {log} 2>&1"


rule summary:
    input:
        comparisons=all_comparisons if FINGERPRINT else all_comparisons(),
        fingerprints=fingerprint_results(),
        own=own_comparisons(),
        script="scripts/summary.py",
        code=SUMMARY_LIBRARY,
        env=env_ready("align"),
    output:
        tsv=report(
            "results/summary.tsv", caption="../report/summary.rst", category="Summary"
        ),
        md="results/summary.md",
    log:
        "results/logs/summary.log",
    benchmark:
        "results/benchmarks/summary.tsv"
    localrule: True
    conda:
        "../envs/align.yaml"
    params:
        python=interpreter("align"),
        own=lambda w, input: " ".join(f"--own {p}" for p in input.own),
        fingerprints=lambda w, input: " ".join(
            f"--fingerprints {p}" for p in input.fingerprints
        ),
    shell:
        "exec {params.python} {input.script} --tsv {output.tsv} --md {output.md}"
        " {params.own} {params.fingerprints} {input.comparisons} > {log} 2>&1"


rule report:
    input:
        comparisons=all_comparisons if FINGERPRINT else all_comparisons(),
        fingerprints=fingerprint_results(),
        own=own_comparisons(),
        script="scripts/report.py",
        code=REPORT_LIBRARY,
        env=env_ready("align"),
    output:
        html=report(
            "results/report.html", caption="../report/report.rst", category="Report"
        ),
        rows=(
            directory("results/report/rows")
            if FINGERPRINT
            else [
                f"results/report/rows/seed_{seed}_step_{step}.tsv"
                for seed in config["seeds"]
                for step in config["steps"]
            ]
        ),
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    localrule: True
    conda:
        "../envs/align.yaml"
    params:
        python=interpreter("align"),
        rows_dir=lambda w, output: (
            output.rows if FINGERPRINT else Path(output.rows[0]).parent
        ),
        reference=REFERENCE,
        candidate=CANDIDATE,
        own=lambda w, input: " ".join(f"--own {p}" for p in input.own),
        fingerprints=lambda w, input: " ".join(
            f"--fingerprints {p}" for p in input.fingerprints
        ),
    shell:
        "exec {params.python} {input.script} --out {output.html} --rows-dir {params.rows_dir}"
        " --reference {params.reference:q} --candidate {params.candidate:q}"
        " {params.own} {params.fingerprints} {input.comparisons} > {log} 2>&1"
