# Without conda, each env file's pip list (or its lock, envs/locks/) becomes a venv under .venvs/,
# built as a job of its own, on the machine that runs Snakemake (localrules in the Snakefile).
# With --use-conda these rules are never needed: every rule's `conda:` env is used instead.
# The builder runs on Snakemake's own interpreter inside `run:`, so how Snakemake was started
# (`snakemake`, `python -m snakemake`, another venv) is neither a param nor code: no rerun.
# The console shows one line per build step (creating, torch, N packages, done in X s); pip's
# output is in results/logs/venv/<env>.log.


for _env in ENVS:

    rule:
        name:
            f"venv_{_env}"
        input:
            spec=f"envs/{_env}.yaml",
            lock=env_lock(_env),
            script="scripts/build_venv.py",
        output:
            f".venvs/{_env}/.built",
        log:
            f"results/logs/venv/{_env}.log",
        benchmark:
            f"results/benchmarks/venv/{_env}.tsv"
        localrule: True
        params:
            target=lambda w, output: Path(output[0]).parent,
            variant=TORCH_VARIANT,
        run:
            build_venv(input, params, log)


rule envs:
    default_target: False
    input:
        [m for env in ENVS for m in env_ready(env)],
    localrule: True
