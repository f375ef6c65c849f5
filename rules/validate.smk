# One validation job per framework, in its own env, before any capture (scripts/validate.py):
# the capture's composed config built into the framework's model on the CPU, the manifests and
# audio files, capture keys set in overrides, and the disk space the sweep's captures need.
# Each problem is one line in the job's log, which Snakemake prints when the job fails.
# Its inputs and params are the capture's (plus its own code), so it reruns only when the
# framework's captures rerun anyway; a capture rule lists validated(fw) among its inputs.

# The capture library (the validation builds the model through the capture script) and the checks.
VALIDATE_LIBRARY = sorted(set(CAPTURE_LIBRARY) | {"src/nestalign/validate.py"})


def validated(framework):
    """The framework's validation file, for its capture rule's input: no capture of it starts
    before its validation passed. The validation reruns only with what reruns these captures
    anyway (the capture's code, sources, config, data, env and overrides) or its own code.
    """
    return [f"results/validation/{framework}.json"]


def override_origins(framework):
    """Where each override comes from in the config, so a refused key names its place."""
    return json.dumps(
        {
            "model_overrides": config["model_overrides"],
            f"frameworks.{framework}.overrides": FRAMEWORKS[framework].get(
                "overrides", []
            ),
        }
    )


for _fw, _spec in FRAMEWORKS.items():

    rule:
        name:
            f"validate_{_fw}"
        input:
            script="scripts/validate.py",
            capture_script=_spec["script"],
            code=VALIDATE_LIBRARY + sources(_spec.get("sources", [])),
            model_config=MODEL_CONFIG,
            data=list(MANIFESTS.values()),
            env=env_ready(_spec["env"]),
        output:
            f"results/validation/{_fw}.json",
        log:
            f"results/logs/validation/{_fw}.log",
        benchmark:
            f"results/benchmarks/validation/{_fw}.tsv"
        conda:
            f"../envs/{_spec['env']}.yaml"
        # The sweep's size (seeds x steps, for the disk check) is a resource, not a param: a
        # param would rerun the validation, and after it every capture, when a seed is added.
        resources:
            mem_mb=CAPTURE_MEM_MB,
            runtime=10,
            sweep_captures=len(config["seeds"]) * len(config["steps"]),
        params:
            python=interpreter(_spec["env"]),
            framework=_fw,
            overrides=capture_overrides(_fw),
            origins=override_origins(_fw),
        shell:
            "exec {params.python} {input.script} --framework {params.framework} --capture-script {input.capture_script}"
            " --config-path config --config-name nest_fast-conformer --origins {params.origins:q}"
            " --captures {resources.sweep_captures} --results results --out {output}"
            " {params.overrides} > {log} 2>&1"
