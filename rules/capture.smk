# One capture run per (framework, seed), in the framework's own environment: it trains once
# through the seed's steps and writes each captured step's directory. Runs resume after the last
# step already captured under the same run key (rules/common.smk), so extending `steps` trains
# only the new steps; seeds whose runs share a plan share a rule (capture_<fw> for runs from
# step 0, capture_<fw>_after_<step> for resumed ones). With `isolation:` the candidate's run
# starts from (and is forced by) the reference's captures of the seed.


for _fw, _spec in FRAMEWORKS.items():
    if _fw not in (REFERENCE, CANDIDATE):
        continue
    for _resume, (_steps, _seeds) in run_groups(_fw).items():
        _span = f"steps_{_steps[0]}-{_steps[-1]}"

        rule:
            name:
                f"capture_{_fw}"
                if _resume is None
                else f"capture_{_fw}_after_{_resume}"
            input:
                script=_spec["script"],
                code=CAPTURE_LIBRARY + sources(_spec.get("sources", [])),
                model_config=MODEL_CONFIG,
                data=list(MANIFESTS.values()),
                env=env_ready(_spec["env"]),
                validated=validated(_fw),
                resume=resume_inputs(_fw, _resume),
                reference=isolation_inputs(_fw, _steps),
            output:
                capture_outputs(_fw, _steps),
            log:
                f"results/logs/capture/{_fw}/seed_{{seed}}/{_span}.log",
            benchmark:
                f"results/benchmarks/capture/{_fw}/seed_{{seed}}/{_span}.tsv"
            wildcard_constraints:
                seed="|".join(_seeds),
            conda:
                f"../envs/{_spec['env']}.yaml"
            threads: THREADS
            resources:
                gpu=1 if config["device"] == "gpu" else 0,
                mem_mb=CAPTURE_MEM_MB,
                runtime=capture_runtime(_resume, _steps),
            params:
                python=interpreter(_spec["env"]),
                overrides=capture_overrides(_fw),
                threads=THREADS,
                deterministic=str(DETERMINISTIC).lower(),
                run_dir=lambda w, fw=_fw: f"results/capture/{fw}/seed_{w.seed}",
                steps=",".join(str(s) for s in _steps),
                run_key=RUN_KEYS[_fw],
                resume=lambda w, fw=_fw, r=_resume: (
                    "" if r is None else f"resume_from={step_dir(fw, w.seed, r)}"
                ),
                isolation=lambda w, fw=_fw: isolation_overrides(fw, w.seed),
                capture=config["capture"]["mode"],
            shell:
                "exec {params.python} {input.script} --config-path config"
                " --config-name nest_fast-conformer {params.overrides}"
                " output_dir={params.run_dir} seed={wildcards.seed} save_steps={params.steps}"
                " threads={params.threads} deterministic={params.deterministic}"
                " capture={params.capture} run_key={params.run_key} {params.resume}"
                " {params.isolation} > {log} 2>&1"


# `isolation: {state: reference}`: one job per (seed, step) captures the candidate's step from
# the reference's complete state after the step before (rules/common.smk, state_inputs).
if STATE:
    _spec = FRAMEWORKS[CANDIDATE]

    rule capture_state:
        input:
            script=_spec["script"],
            code=CAPTURE_LIBRARY + sources(_spec.get("sources", [])),
            model_config=MODEL_CONFIG,
            data=list(MANIFESTS.values()),
            env=env_ready(_spec["env"]),
            validated=validated(CANDIDATE),
            reference=state_inputs,
            name_map=[config["name_map"]] if config.get("name_map") else [],
        output:
            state_files() if KEEP_CAPTURES else temp(state_files()),
        log:
            f"results/logs/state/{CANDIDATE}/seed_{{seed}}/step_{{step}}.log",
        benchmark:
            f"results/benchmarks/state/{CANDIDATE}/seed_{{seed}}/step_{{step}}.tsv"
        wildcard_constraints:
            seed=r"\d+",
            step=r"\d+",
        conda:
            f"../envs/{_spec['env']}.yaml"
        threads: THREADS
        resources:
            gpu=1 if config["device"] == "gpu" else 0,
            mem_mb=CAPTURE_MEM_MB,
            runtime=capture_runtime(0, [1]),
        params:
            python=interpreter(_spec["env"]),
            overrides=capture_overrides(CANDIDATE),
            threads=THREADS,
            deterministic=str(DETERMINISTIC).lower(),
            run_dir=lambda w: f"results/state/{CANDIDATE}/seed_{w.seed}",
            run_key=RUN_KEYS[CANDIDATE],
            isolation=state_overrides,
        shell:
            "exec {params.python} {input.script} --config-path config"
            " --config-name nest_fast-conformer {params.overrides}"
            " output_dir={params.run_dir} seed={wildcards.seed} save_steps={wildcards.step}"
            " threads={params.threads} deterministic={params.deterministic}"
            " run_key={params.run_key} {params.isolation} > {log} 2>&1"


# `capture: {mode: fingerprint}`: the step a seed's fingerprint compare localises (rules/compare.smk,
# compare_fingerprints) is captured again with every tensor, by a run from step 0 of its own.
if FINGERPRINT:
    for _fw in (REFERENCE, CANDIDATE):
        _spec = FRAMEWORKS[_fw]

        rule:
            name:
                f"localise_{_fw}"
            input:
                script=_spec["script"],
                code=CAPTURE_LIBRARY + sources(_spec.get("sources", [])),
                model_config=MODEL_CONFIG,
                data=list(MANIFESTS.values()),
                env=env_ready(_spec["env"]),
                validated=validated(_fw),
            output:
                full_files(_fw) if KEEP_CAPTURES else temp(full_files(_fw)),
            log:
                f"results/logs/full/{_fw}/seed_{{seed}}/step_{{step}}.log",
            benchmark:
                f"results/benchmarks/full/{_fw}/seed_{{seed}}/step_{{step}}.tsv"
            wildcard_constraints:
                seed=r"\d+",
                step=r"\d+",
            conda:
                f"../envs/{_spec['env']}.yaml"
            threads: THREADS
            resources:
                gpu=1 if config["device"] == "gpu" else 0,
                mem_mb=CAPTURE_MEM_MB,
                runtime=lambda w: capture_runtime(None, [int(w.step)]),
            params:
                python=interpreter(_spec["env"]),
                overrides=capture_overrides(_fw),
                threads=THREADS,
                deterministic=str(DETERMINISTIC).lower(),
                run_dir=lambda w, fw=_fw: f"results/full/{fw}/seed_{w.seed}",
                run_key=RUN_KEYS[_fw],
            shell:
                "exec {params.python} {input.script} --config-path config"
                " --config-name nest_fast-conformer {params.overrides}"
                " output_dir={params.run_dir} seed={wildcards.seed} save_steps={wildcards.step}"
                " threads={params.threads} deterministic={params.deterministic}"
                " capture=full run_key={params.run_key} > {log} 2>&1"
