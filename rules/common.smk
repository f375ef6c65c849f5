# Paths, environment selection and helpers shared by the rules.

import json
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod

USE_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
FRAMEWORKS = config["frameworks"]
REFERENCE = config["reference"]
CANDIDATE = config["candidate"]
for _role, _name in (("reference", REFERENCE), ("candidate", CANDIDATE)):
    if _name not in FRAMEWORKS:
        raise ValueError(
            f"config: {_role} {_name!r} is not one of the frameworks {sorted(FRAMEWORKS)}"
        )
if REFERENCE == CANDIDATE:
    raise ValueError(f"config: reference and candidate are both {REFERENCE!r}")

DATA = "results/data"
MANIFESTS = {s: f"{DATA}/{s}_manifest.json" for s in ("train", "val", "noise")}
MODEL_CONFIG = "config/nest_fast-conformer.yaml"
CAPTURE_FILES = (
    "metadata.json",
    "model_structure.json",
    "batch.pt",
    "forward_output.pt",
    "loss.pt",
    "parameter_gradients.pt",
    "parameter_weights.pt",
    "layer_outputs.pt",
    "initial_weights.pt",
    "initial_rng.pt",
)
LIBRARY = sorted(str(p) for p in Path("src/nestalign").rglob("*.py"))


def step_dir(framework, seed, step):
    return f"results/capture/{framework}/seed_{seed}/step_{step}"


def capture_files(framework, seed="{seed}", step="{step}"):
    return [f"{step_dir(framework, seed, step)}/{name}" for name in CAPTURE_FILES]


def all_captures():
    return [
        path
        for framework in (REFERENCE, CANDIDATE)
        for seed in config["seeds"]
        for step in config["steps"]
        for path in capture_files(framework, seed, step)
    ]


def all_comparisons():
    return [
        f"results/compare/seed_{seed}/step_{step}.pkl"
        for seed in config["seeds"]
        for step in config["steps"]
    ]


def sources(folders):
    """Python files under the given folders: edits to them rerun the jobs that list them."""
    return sorted(str(p) for folder in folders for p in Path(folder).rglob("*.py"))


def interpreter(env):
    """`python` of the conda env, a configured interpreter, or the venv the workflow builds."""
    if USE_CONDA:
        return "python"
    return config["interpreters"].get(env, f".venvs/{env}/bin/python")


def env_ready(env):
    """The venv's marker as an input in venv mode, so a pin change rebuilds it first."""
    if USE_CONDA or env in config["interpreters"]:
        return []
    return [f".venvs/{env}/.built"]


def capture_overrides(framework):
    accelerator = "gpu" if config["device"] == "gpu" else "cpu"
    items = [
        f"model.train_ds.manifest_filepath={MANIFESTS['train']}",
        f"model.train_ds.noise_manifest={MANIFESTS['noise']}",
        f"model.validation_ds.manifest_filepath={MANIFESTS['val']}",
        *config["model_overrides"],
        *FRAMEWORKS[framework].get("overrides", []),
        f"trainer.accelerator={accelerator}",
        "trainer.devices=1",
    ]
    return " ".join(shlex.quote(item) for item in items)


ISOLATION = config.get("isolation") or {}
ISOLATED = ISOLATION.get("init") == "reference" or bool(ISOLATION.get("forcing"))


def isolation_inputs(framework):
    """The reference's step files that an isolated candidate capture starts from."""
    if framework != CANDIDATE or not ISOLATED:
        return []
    return capture_files(REFERENCE)


def isolation_overrides(framework, seed, step):
    """init_from / force_from (and the name map) for an isolated candidate capture."""
    if framework != CANDIDATE or not ISOLATED:
        return ""
    ref = step_dir(REFERENCE, seed, step)
    items = [f"init_from={ref}"]
    if ISOLATION.get("forcing"):
        items.append(f"force_from={ref}")
    if config.get("name_map"):
        items.append(f"name_map={config['name_map']}")
    return " ".join(shlex.quote(item) for item in items)


def tolerance_option():
    """config["tolerance"] as an inline mapping for scripts/compare.py, or nothing."""
    tol = config.get("tolerance") or {}
    return f"--tolerances {shlex.quote(json.dumps(tol, sort_keys=True))}" if tol else ""


ENVS = sorted({spec["env"] for spec in FRAMEWORKS.values()} | {"align"})
DRIVER_PYTHON = sys.executable
