# Paths, environment selection and helpers shared by the rules.

import functools
import hashlib
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
    "training_state.pt",
    "tensor_index.json",
    "config.yaml",
)
# What each side imports of the library (tests/test_triggers.py checks these against the imports):
# an edit reruns only the jobs that run that code.
CAPTURE_LIBRARY = [
    f"src/nestalign/{name}.py"
    for name in (
        "__init__",
        "align",
        "artifacts",
        "callback",
        "capture",
        "flat",
        "forcing",
        "manifests",
        "namemap",
        "resume",
        "runner",
        "state",
        "tensor_scan",
    )
]
COMPARE_LIBRARY = sorted(str(p) for p in Path("src/nestalign/compare").glob("*.py")) + [
    f"src/nestalign/{name}.py"
    for name in (
        "__init__",
        "align",
        "artifacts",
        "flat",
        "fused",
        "metrics",
        "namemap",
        "tensor_scan",
    )
]
FINGERPRINT_LIBRARY = COMPARE_LIBRARY + ["src/nestalign/fingerprints.py"]
SUMMARY_LIBRARY = FINGERPRINT_LIBRARY + ["src/nestalign/summary.py"]
REPORT_LIBRARY = SUMMARY_LIBRARY + [
    f"src/nestalign/report{p}.py" for p in ("", "_rows", "_svg")
]
DATA_LIBRARY = ["src/nestalign/dummy_data.py"]


# `capture: {mode: fingerprint}`: the runs keep only each tensor's fingerprint (hash and
# statistics); a compare of the fingerprints per seed (a checkpoint) picks the step to localise,
# which both frameworks then capture again in full under results/full/ (rule localise_<fw>).
FINGERPRINT = config["capture"]["mode"] == "fingerprint"
FINGERPRINT_FILES = (
    "metadata.json",
    "model_structure.json",
    "tensor_index.json",
    "config.yaml",
)
RUN_FILES = FINGERPRINT_FILES if FINGERPRINT else CAPTURE_FILES


def step_dir(framework, seed, step):
    return f"results/capture/{framework}/seed_{seed}/step_{step}"


def capture_files(framework, seed="{seed}", step="{step}"):
    """A run's files of one step (fingerprints only in fingerprint mode)."""
    return [f"{step_dir(framework, seed, step)}/{name}" for name in RUN_FILES]


def full_dir(framework, seed, step):
    """Where a step compared in full lies: the run's own capture, or its full recapture."""
    if FINGERPRINT:
        return f"results/full/{framework}/seed_{seed}/step_{step}"
    return step_dir(framework, seed, step)


def full_files(framework, seed="{seed}", step="{step}"):
    return [f"{full_dir(framework, seed, step)}/{name}" for name in CAPTURE_FILES]


KEEP_CAPTURES = bool(config.get("keep_captures", True))


def capture_outputs(framework, steps):
    """A run's step files: temporary with keep_captures: false (deleted once compared)."""
    files = [path for step in steps for path in capture_files(framework, step=step)]
    return files if KEEP_CAPTURES else temp(files)


def comparison(seed, step):
    return f"results/compare/seed_{seed}/step_{step}.pkl"


# The compare: one job per seed, every step in one process (torch imported once); in fingerprint
# mode one per localised step. COMPARE_JOB names its log and benchmark files.
COMPARE_JOB = "seed_{seed}/step_{step}" if FINGERPRINT else "seed_{seed}"


def compared_steps(wildcards):
    return [int(wildcards.step)] if FINGERPRINT else STEPS


def compare_outputs(folder):
    """The job's comparisons (``folder``/seed_S/step_N.pkl), wildcards left in."""
    steps = ["{step}"] if FINGERPRINT else STEPS
    return [f"{folder}/seed_{{seed}}/step_{step}.pkl" for step in steps]


def compared_files(framework, where=None):
    """An input function: the step files the job compares, from ``where(seed, step)`` (each
    step's directory; default: full_dir of ``framework``)."""
    where = where or functools.partial(full_dir, framework)
    return lambda w: [
        f"{where(w.seed, step)}/{name}"
        for step in compared_steps(w)
        for name in CAPTURE_FILES
    ]


def compared_run(framework, where=None):
    """A params function: the run directory that holds the job's step_N directories."""
    where = where or functools.partial(full_dir, framework)
    return lambda w: str(Path(where(w.seed, compared_steps(w)[0])).parent)


def fingerprint_results():
    """The fingerprint compares, one per seed (fingerprint mode)."""
    if not FINGERPRINT:
        return []
    return [f"results/fingerprints/seed_{seed}.json" for seed in config["seeds"]]


def all_comparisons(wildcards=None):
    """Every step's comparison; in fingerprint mode, each seed's localised step's (known once
    that seed's fingerprint compare has run)."""
    if not FINGERPRINT:
        return [
            comparison(seed, step)
            for seed in config["seeds"]
            for step in config["steps"]
        ]
    out = []
    for seed in config["seeds"]:
        done = checkpoints.compare_fingerprints.get(seed=seed).output[0]
        step = json.loads(Path(done).read_text())["localise"]
        out += [] if step is None else [comparison(seed, step)]
    return out


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


# Runs: one capture job per (framework, seed) trains once through the seed's steps. A run whose
# earlier steps are on disk, complete and made by the same run key (everything that decides what
# a capture holds) resumes after the last of them: only new steps train. The resumed-from step's
# files are the job's declared inputs; a changed key reruns the seed from step 0.
STEPS = sorted({int(s) for s in config["steps"]})


def _digest(paths):
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.encode())
        h.update(Path(path).read_bytes() if Path(path).is_file() else b"<missing>")
    return h.hexdigest()


@functools.cache
def run_key(framework):
    """What decides a framework's captures, hashed: code, configs, data, numerics, isolation."""
    spec = FRAMEWORKS[framework]
    files = [
        spec["script"],
        MODEL_CONFIG,
        f"envs/{spec['env']}.yaml",
        *env_lock(spec["env"]),
    ]
    files += CAPTURE_LIBRARY + DATA_LIBRARY + sources(spec.get("sources", []))
    files += [config["name_map"]] if config.get("name_map") else []
    facts = {
        "framework": framework,
        "overrides": capture_overrides(framework),
        "data": config["data"],
        "threads": THREADS,
        "deterministic": DETERMINISTIC,
        "device": config["device"],
        "capture": config["capture"]["mode"],
        "files": _digest(files),
    }
    if framework == CANDIDATE and ISOLATED:  # the reference's captures are its inputs
        facts["isolation"] = {
            "init": ISOLATION.get("init"),
            "forcing": bool(ISOLATION.get("forcing")),
            "reference": run_key(REFERENCE),
        }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _captured(framework, seed, step, key):
    """Metadata of a complete capture of this step made under ``key``, or None."""
    if not all(Path(p).is_file() for p in capture_files(framework, seed, step)):
        return None
    try:
        meta = json.loads(
            Path(step_dir(framework, seed, step), "metadata.json").read_text()
        )
    except (OSError, ValueError):
        return None
    return meta if meta.get("run_key") == key else None


def framework_steps(framework):
    """The steps a framework's runs capture: with `isolation: {state: reference}` the reference
    also captures the step before each captured one (the state the candidate's step starts from).
    """
    if framework == REFERENCE and STATE:
        return sorted({*STEPS, *(s - 1 for s in STEPS if s > 0)})
    return STEPS


def run_plan(framework, seed):
    """(the step to resume after or None, the steps this run captures) for one seed."""
    key = RUN_KEYS[framework]
    steps = framework_steps(framework)
    done = None
    for step in steps:
        meta = _captured(framework, seed, step, key)
        if meta is None:
            break
        done = (step, meta)
    if done is None:
        return None, steps
    todo = [s for s in steps if s > done[0]]
    if todo and (FINGERPRINT or not done[1].get("resumable")):
        # its loader could not be resumed, or the run kept no state: it reruns from step 0
        return None, steps
    return done[0], todo


def run_groups(framework):
    """{resume step or None: (steps, seeds)}: seeds whose runs share a plan share a rule."""
    groups = {}
    for seed in config["seeds"]:
        resume, todo = run_plan(framework, seed)
        if todo:
            groups.setdefault(resume, (todo, []))[1].append(str(seed))
    return groups


def resume_inputs(framework, resume):
    """The files a resumed run starts from: the step's weights, training state and metadata."""
    if resume is None:
        return []
    names = ("metadata.json", "parameter_weights.pt", "training_state.pt")
    names += ("initial_weights.pt", "initial_rng.pt")
    return [f"{step_dir(framework, '{seed}', resume)}/{name}" for name in names]


ISOLATION = config.get("isolation") or {}
ISOLATED = ISOLATION.get("init") == "reference" or bool(ISOLATION.get("forcing"))
STATE = ISOLATION.get("state") == "reference"
if FINGERPRINT and (ISOLATED or STATE):
    raise ValueError(
        "config: capture.mode fingerprint does not combine with isolation (a fingerprint "
        "capture holds no tensors to start or force the candidate from): set isolation to "
        "{init: null, forcing: false, state: null} or capture.mode to full"
    )


def isolation_inputs(framework, steps):
    """The reference's files an isolated candidate run starts from (and is forced by)."""
    if framework != CANDIDATE or not ISOLATED:
        return []
    forced = steps if ISOLATION.get("forcing") else []
    return sorted(
        {p for step in {STEPS[0], *forced} for p in capture_files(REFERENCE, step=step)}
    )


def isolation_overrides(framework, seed):
    """init_from / force_from (and the name map) for an isolated candidate run."""
    if framework != CANDIDATE or not ISOLATED:
        return ""
    items = [f"init_from={step_dir(REFERENCE, seed, STEPS[0])}"]
    if ISOLATION.get("forcing"):
        items.append(f"force_from=results/capture/{REFERENCE}/seed_{seed}")
    if config.get("name_map"):
        items.append(f"name_map={config['name_map']}")
    return " ".join(shlex.quote(item) for item in items)


# Step-level isolation (`isolation: {state: reference}`): beside its free run, the candidate
# captures each step N in a process of its own that starts from the reference's complete state
# after step N-1 (step 0: from the reference's initial state), so that step's error is its own.
def state_dir(seed, step):
    return f"results/state/{CANDIDATE}/seed_{seed}/step_{step}"


def state_files(seed="{seed}", step="{step}"):
    return [f"{state_dir(seed, step)}/{name}" for name in CAPTURE_FILES]


def state_inputs(wildcards):
    """The reference's files a state-isolated step starts from (and is forced by)."""
    step = int(wildcards.step)
    if step == 0:
        first = step_dir(REFERENCE, wildcards.seed, 0)
        names = ("metadata.json", "initial_weights.pt", "initial_rng.pt")
        start = [f"{first}/{name}" for name in names]
    else:
        start = [
            p.format(seed=wildcards.seed) for p in resume_inputs(REFERENCE, step - 1)
        ]
    forced = (
        capture_files(REFERENCE, wildcards.seed, step)
        if ISOLATION.get("forcing")
        else []
    )
    return sorted({*start, *forced})


def state_overrides(wildcards):
    """state_from (init_from at step 0), force_from and the name map of a state-isolated step."""
    seed, step = wildcards.seed, int(wildcards.step)
    items = (
        [f"init_from={step_dir(REFERENCE, seed, 0)}"]
        if step == 0
        else [f"state_from={step_dir(REFERENCE, seed, step - 1)}"]
    )
    if ISOLATION.get("forcing"):
        items.append(f"force_from={step_dir(REFERENCE, seed, step)}")
    if config.get("name_map"):
        items.append(f"name_map={config['name_map']}")
    return " ".join(shlex.quote(item) for item in items)


def own_comparisons():
    """The state-isolated comparisons (each step's own error), when the config asks for them."""
    if not STATE:
        return []
    return [
        f"results/compare/state/seed_{seed}/step_{step}.pkl"
        for seed in config["seeds"]
        for step in config["steps"]
    ]


def tolerance_option():
    """config["tolerance"] as an inline mapping for scripts/compare.py, or nothing."""
    tol = config.get("tolerance") or {}
    return f"--tolerances {shlex.quote(json.dumps(tol, sort_keys=True))}" if tol else ""


ENVS = sorted({spec["env"] for spec in FRAMEWORKS.values()} | {"align"})
# The torch build of the venvs: the CPU wheels (PyTorch's CPU index) or PyPI's CUDA build.
TORCH_VARIANT = "cuda" if config["device"] == "gpu" else "cpu"


def env_lock(env):
    """envs/locks/<env>-<variant>.txt when it exists: the venv is built from it, every pin exact."""
    lock = Path(f"envs/locks/{env}-{TORCH_VARIANT}.txt")
    return [str(lock)] if lock.is_file() else []


# Capture numerics: params of the capture jobs, so a change reruns the captures. The configured
# thread count goes to the script as such: Snakemake scales `threads:` down to --cores (-j1),
# which must not change what a capture computes. The compare takes as many (scaled down freely:
# its figures do not depend on its thread count).
THREADS = config["threads"]
DETERMINISTIC = bool(config.get("deterministic", True))


# Cluster resources, derived from the model size in the config (`model.encoder.d_model` and
# `n_layers` from model_overrides over config/nest_fast-conformer.yaml). Measured on the CPU:
# the full size (d 512, 17 layers, 113 M parameters) needs about 6 GB per capture (5.8 GiB peak:
# a step is written in the background while the next one is recorded) and 2 minutes for steps
# 0-1; a run trains from its start (step 0, or the step it resumes after) to its last.
def _encoder_size():
    import yaml

    encoder = yaml.safe_load(Path(MODEL_CONFIG).read_text())["model"]["encoder"]
    size = {"d_model": int(encoder["d_model"]), "n_layers": int(encoder["n_layers"])}
    for item in config["model_overrides"]:
        key, _, value = item.lstrip("+").partition("=")
        name = key.removeprefix("model.encoder.")
        if key.startswith("model.encoder.") and name in size and value.isdigit():
            size[name] = int(value)
    return size


def model_mparams():
    """Approximate parameter count in millions (about 23 d_model^2 per conformer layer)."""
    size = _encoder_size()
    return size["n_layers"] * 23 * size["d_model"] ** 2 / 1e6


def _round_up(value, unit):
    return int(-(-value // unit) * unit)


MPARAMS = model_mparams()
CAPTURE_MEM_MB = _round_up(3000 + 35 * MPARAMS, 500)
COMPARE_MEM_MB = _round_up(2000 + 20 * MPARAMS, 500)


def capture_runtime(resume, steps):
    """Minutes for one run: start-up plus the steps it trains."""
    trained = steps[-1] - (-1 if resume is None else resume)
    return _round_up(10 + MPARAMS * trained / 20, 5)


COMPARE_RUNTIME = _round_up(5 + MPARAMS * (1 if FINGERPRINT else len(STEPS)) / 20, 5)


def build_venv(input, params, log):
    """The venv rules' job: scripts/build_venv.py on Snakemake's own interpreter.

    pip's output goes to the log only, the builder's progress lines (stderr) to both the log
    and the console.
    """
    import subprocess

    cmd = [sys.executable, input.script, input.spec, str(params.target)]
    cmd += ["--variant", params.variant] + (
        ["--lock", input.lock[0]] if input.lock else []
    )
    with open(log[0], "w", buffering=1) as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:
            sys.stderr.write(line)
            fh.write(line)
        if proc.wait():
            raise subprocess.CalledProcessError(proc.returncode, cmd)


RUN_KEYS = {framework: run_key(framework) for framework in (REFERENCE, CANDIDATE)}
