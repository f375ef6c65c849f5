# Fan-in: the comparisons (a job per seed, a pickle per step), then the summary and the report.


rule compare:
    input:
        ref=compared_files(REFERENCE),
        cand=compared_files(CANDIDATE),
        script="scripts/compare.py",
        code=COMPARE_LIBRARY,
        name_map=[config["name_map"]] if config.get("name_map") else [],
        env=env_ready("align"),
    output:
        compare_outputs("results/compare"),
    log:
        f"results/logs/compare/{COMPARE_JOB}.log",
    benchmark:
        f"results/benchmarks/compare/{COMPARE_JOB}.tsv"
    wildcard_constraints:
        seed=r"\d+",
        step=r"\d+",
    conda:
        "../envs/align.yaml"
    threads: THREADS
    resources:
        mem_mb=COMPARE_MEM_MB,
        runtime=COMPARE_RUNTIME,
    params:
        python=interpreter("align"),
        ref=compared_run(REFERENCE),
        cand=compared_run(CANDIDATE),
        steps=lambda w: ",".join(str(s) for s in compared_steps(w)),
        out_dir=lambda w: f"results/compare/seed_{w.seed}",
        tolerance=tolerance_option(),
        name_map=f"--name-map {config['name_map']}" if config.get("name_map") else "",
    shell:
        "exec {params.python} {input.script} --ref-run {params.ref} --cand-run {params.cand}"
        " --steps {params.steps} {params.tolerance} {params.name_map} --threads {threads}"
        " --out-dir {params.out_dir} > {log} 2>&1"


# `isolation: {state: reference}`: each step's own error, the candidate's step started from the
# reference's state after the step before.
if STATE:

    use rule compare as compare_state with:
        input:
            ref=compared_files(REFERENCE, functools.partial(step_dir, REFERENCE)),
            cand=compared_files(CANDIDATE, state_dir),
            script="scripts/compare.py",
            code=COMPARE_LIBRARY,
            name_map=[config["name_map"]] if config.get("name_map") else [],
            env=env_ready("align"),
        output:
            compare_outputs("results/compare/state"),
        log:
            f"results/logs/compare/state/{COMPARE_JOB}.log",
        benchmark:
            f"results/benchmarks/compare/state/{COMPARE_JOB}.tsv"
        params:
            python=interpreter("align"),
            ref=compared_run(REFERENCE, functools.partial(step_dir, REFERENCE)),
            cand=compared_run(CANDIDATE, state_dir),
            steps=lambda w: ",".join(str(s) for s in compared_steps(w)),
            out_dir=lambda w: f"results/compare/state/seed_{w.seed}",
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
