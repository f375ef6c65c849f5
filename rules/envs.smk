# Without conda, each env file's pip list becomes a venv under .venvs/, built as a job of its own.
# With --use-conda these rules are never needed: every rule's `conda:` env is used instead.


for _env in ENVS:

    rule:
        name:
            f"venv_{_env}"
        input:
            spec=f"envs/{_env}.yaml",
            script="scripts/build_venv.py",
        output:
            f".venvs/{_env}/.built",
        log:
            f"results/logs/venv/{_env}.log",
        benchmark:
            f"results/benchmarks/venv/{_env}.tsv"
        conda:
            f"../envs/{_env}.yaml"
        params:
            python=DRIVER_PYTHON,
            target=lambda w, output: Path(output[0]).parent,
        shell:
            "{params.python} {input.script} {input.spec} {params.target} > {log} 2>&1"


rule envs:
    default_target: False
    input:
        [m for env in ENVS for m in env_ready(env)],
