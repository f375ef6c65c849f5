# One capture job per (framework, seed, step), each in its framework's own environment.
# A job trains from scratch up to its step and saves that step only, so steps are independent jobs.
# With `isolation:` the candidate's job starts from (and is forced by) the reference's step.


for _fw, _spec in FRAMEWORKS.items():

    rule:
        name:
            f"capture_{_fw}"
        input:
            script=_spec["script"],
            code=CAPTURE_LIBRARY + sources(_spec.get("sources", [])),
            model_config=MODEL_CONFIG,
            data=list(MANIFESTS.values()),
            env=env_ready(_spec["env"]),
            reference=isolation_inputs(_fw),
        output:
            capture_outputs(_fw),
        log:
            f"results/logs/capture/{_fw}/seed_{{seed}}/step_{{step}}.log",
        benchmark:
            f"results/benchmarks/capture/{_fw}/seed_{{seed}}/step_{{step}}.tsv"
        wildcard_constraints:
            seed=r"\d+",
            step=r"\d+",
        conda:
            f"../envs/{_spec['env']}.yaml"
        threads: THREADS
        resources:
            gpu=1 if config["device"] == "gpu" else 0,
            mem_mb=CAPTURE_MEM_MB,
            runtime=capture_runtime,
        params:
            python=interpreter(_spec["env"]),
            overrides=capture_overrides(_fw),
            threads=THREADS,
            deterministic=str(DETERMINISTIC).lower(),
            run_dir=lambda w, fw=_fw: f"results/capture/{fw}/seed_{w.seed}",
            isolation=lambda w, fw=_fw: isolation_overrides(fw, w.seed, w.step),
        shell:
            "{params.python} {input.script} --config-path config --config-name nest_fast-conformer"
            " {params.overrides} output_dir={params.run_dir} seed={wildcards.seed}"
            " save_steps={wildcards.step} threads={params.threads}"
            " deterministic={params.deterministic} {params.isolation} > {log} 2>&1"
