"""GPU check: NeMo and nest on CUDA (deterministic), parity, repeatability and CPU vs GPU.

    python3 scripts/gpu_check.py                       # on the GPU machine's own python (3.12)
    python3 scripts/gpu_check.py --device cpu --sizes tiny --frameworks nest   # the same on CPU
    python3 scripts/gpu_check.py --dry-run             # print the plan, run nothing
    python3 scripts/gpu_check.py --download-wheels .gpu-wheels   # `make gpu-wheels`, with network

Runs on the interpreter that starts it, not on the workflow's envs: a machine with a CUDA torch
and no network. What that interpreter lacks comes from the wheels carried in the working tree
(--wheels, default .gpu-wheels/, filled by `make gpu-wheels`), installed with
`pip install --no-index --no-deps --target WORK/site` and put on PYTHONPATH with src/.

Cases, each for steps 0 and 1 (one line of figures per case and step):
  SIZE parity      NeMo run a vs nest run a on DEVICE            (tiny and full size)
  SIZE repeat-FW   FW run a vs FW run b on DEVICE (run-to-run)   (tiny and full size)
  SIZE cross-FW    FW on CPU vs FW on DEVICE, the DEVICE run started from the CPU run's initial
                   state (init_from) and teacher-forced by its step (force_from)   (tiny; --cross)
Every capture runs deterministic (deterministic algorithms, CUBLAS_WORKSPACE_CONFIG=:4096:8,
TF32 off) with the same seed. A line: case, verdict, worst max abs per category, and seconds
(reference capture + candidate capture + compare; a capture run serves both steps).
Exit status 0 when every case ran (whatever the verdicts; --strict: only when all pass).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".gpu-wheels"
FRAMEWORKS = ("nemo", "nest")
SIZES = ("tiny", "full")
CASES = ("parity", "repeat", "cross")
STEPS = (0, 1)
CATEGORIES = ("init", "batch", "forward", "loss", "grads", "weights", "layers", "layer_grads")
SIZE_CONFIGS = {"tiny": ROOT / "config/config.yaml", "full": ROOT / "config/sweeps/full.yaml"}
WHEEL_LIMIT_MB = 60  # the device tool carries 64 MiB of ignored paths in all

# What the GPU machine's python (3.12, CUDA torch, no network) lacks. NeMo's list is the verified
# one (../shared/gpu/nemo-wheels-py312.txt); the nest side (lightning, hydra-core, omegaconf,
# soundfile, numpy, pyyaml) needs nothing beyond it, nor do the capture's hash (xxhash) and the
# compare (numba): numpy, numba, xxhash and pyyaml are on that machine.
GPU_WHEELS = [
    "nemo_toolkit==3.0.0",
    "lightning==2.4.0",
    "hydra-core==1.3.2",
    "omegaconf==2.3.0",
    "lhotse==1.33.0",
    "librosa==0.11.0",
    "soundfile==0.14.0",
    "audioread==3.1.0",
    "soxr==1.1.0",
    "pooch==1.9.0",
    "kaldialign==0.12.0",
    "braceexpand==0.1.7",
    "webdataset==1.0.2",
    "datasets==5.2.0",
    "dill==0.4.1",
    "multiprocess==0.70.19",
    "nv-one-logger-core==2.3.1",
    "nv-one-logger-training-telemetry==2.3.1",
    "nv-one-logger-pytorch-lightning-integration==2.3.1",
    "StrEnum==0.4.15",
    "annotated-types==0.8.0",
    "pydantic==2.14.4",
    "pydantic_core==2.50.5",
    "typing-inspection==0.4.5",
    "cffi==2.1.1",
    "cytoolz==1.2.0",
    "decorator==5.3.1",
    "googleapis-common-protos==1.76.0",
    "intervaltree==3.2.1",
    "overrides==7.7.0",
    "platformdirs==4.14.8",
    "sniffio==1.3.1",
    "toml==0.10.2",
    "truststore==0.10.5",
]
# No wheel on the registry: built here from its sdist (pure Python).
GPU_SDIST_WHEELS = ["antlr4-python3-runtime==4.9.3"]
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
    "any",
]
# Imported by the captures on that interpreter (the preflight checks each).
NEEDS = {
    "nest": ["torch", "numpy", "yaml", "omegaconf", "hydra", "lightning", "soundfile"],
    "nemo": ["nemo.collections.asr.models.ssl_models"],
}


@dataclass
class Run:
    """One capture process: a framework on a device, saving steps into its folder."""

    name: str
    framework: str
    size: str
    device: str  # cpu | cuda
    steps: tuple[int, ...]
    init_from: str | None = None
    force_from: str | None = None
    after: str | None = None  # the run whose folder it starts from
    seconds: float | None = None
    error: str | None = None


@dataclass
class Case:
    name: str
    step: int
    ref: str
    cand: str
    force: bool = False  # the two sides differ in device: compare with --force
    result: dict = field(default_factory=dict)
    seconds: float | None = None
    error: str | None = None


def download_wheels(dest: Path) -> int:
    """Fill DEST with the py312 manylinux wheels of GPU_WHEELS (needs PyPI) and print the size."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    _echo(cmd + GPU_WHEELS)
    subprocess.run(cmd + GPU_WHEELS, check=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dest)]
    _echo(cmd + GPU_SDIST_WHEELS)
    subprocess.run(cmd + GPU_SDIST_WHEELS, check=True)
    wheels = sorted(dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{dest}: {len(wheels)} wheels, {size:.1f} MiB (limit {WHEEL_LIMIT_MB} MiB)")
    return 0 if size <= WHEEL_LIMIT_MB else 1


def _echo(cmd: list[str]) -> None:
    print("+", " ".join(shlex.quote(str(c)) for c in cmd), flush=True)


def install_wheels(wheels: Path, site: Path, dry_run: bool) -> list[str]:
    """pip install --no-index --no-deps --target SITE (unzipped when pip is missing); skip when
    SITE already holds exactly these wheels."""
    files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not files:
        print(f"# no wheels in {wheels}: using {sys.executable} as it is", flush=True)
        return []
    names = [f.name for f in files]
    marker = site / ".wheels.json"
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet"]
    cmd += ["--target", str(site), *map(str, files)]
    if dry_run:
        _echo(cmd)
        return names
    if marker.is_file() and json.loads(marker.read_text()) == names:
        print(f"# {len(names)} wheels already in {site}", flush=True)
        return names
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    if has_pip.returncode == 0:
        _echo(cmd[:9] + [f"{wheels}/*.whl ({len(files)})"])
        subprocess.run(cmd, check=True)
    else:  # a wheel is a zip of its files: what --target does, without scripts
        for wheel in files:
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(site)
        for data in site.glob("*.data"):
            for sub in ("purelib", "platlib"):
                for item in (data / sub).glob("*") if (data / sub).is_dir() else []:
                    shutil.move(str(item), site / item.name)
        print(f"# unzipped {len(files)} wheels into {site} (no pip)", flush=True)
    marker.write_text(json.dumps(names))
    return names


def child_env(site: Path | None, device: str) -> dict[str, str]:
    paths = [str(ROOT / "src")] + ([str(site)] if site else [])
    old = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths + ([old] if old else []))}
    env.update(CUBLAS_WORKSPACE_CONFIG=":4096:8", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="0")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU check never touches a GPU
    return env


def preflight(frameworks: list[str], device: str, env: dict[str, str]) -> str:
    """Import what the captures import; the versions and the device, or SystemExit naming the
    missing module."""
    modules = [m for fw in ("nest", *frameworks) for m in NEEDS[fw]]
    code = (
        "import importlib, sys, torch\n"
        f"for m in {sorted(set(modules))!r}:\n"
        "    importlib.import_module(m)\n"
        "from importlib.metadata import version\n"
        "v = {d: version(d) for d in ('torch', 'lightning', 'omegaconf', 'hydra-core', 'numpy')}\n"
        f"if {'nemo' in frameworks!r}: v['nemo_toolkit'] = version('nemo_toolkit')\n"
        "cuda = torch.cuda.is_available()\n"
        "gpu = torch.cuda.get_device_name(0) if cuda else 'none'\n"
        "print(f'python {sys.version.split()[0]}', *(f'{k} {x}' for k, x in v.items()),\n"
        "      f'cuda {torch.version.cuda} available {cuda} gpu {gpu!r}', sep=', ')\n"
        f"sys.exit(3 if {device == 'cuda'!r} and not cuda else 0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode == 3:
        raise SystemExit(f"--device cuda, but torch sees no GPU: {proc.stdout.strip()}")
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        raise SystemExit(f"preflight failed on {sys.executable}: {tail[0]}")
    return proc.stdout.strip()


def size_overrides(size: str) -> list[str]:
    import yaml

    return list(yaml.safe_load(SIZE_CONFIGS[size].read_text())["model_overrides"])


def tolerances() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "config/config.yaml").read_text()).get("tolerance") or {}


def plan(args: argparse.Namespace) -> tuple[list[Run], list[Case]]:
    runs: dict[str, Run] = {}
    cases: list[Case] = []
    dev = args.device

    def run(fw: str, size: str, label: str, device: str, **kw) -> str:
        name = f"{size}/{fw}-{label}"
        runs.setdefault(name, Run(name, fw, size, device, kw.pop("steps", STEPS), **kw))
        return name

    for size in args.sizes:
        if "parity" in args.cases and set(FRAMEWORKS) <= set(args.frameworks):
            a, b = run("nemo", size, f"{dev}-a", dev), run("nest", size, f"{dev}-a", dev)
            cases += [Case(f"{size} parity nemo/nest {dev}", s, a, b) for s in STEPS]
        for fw in args.frameworks:
            if "repeat" in args.cases:
                a, b = run(fw, size, f"{dev}-a", dev), run(fw, size, f"{dev}-b", dev)
                cases += [Case(f"{size} repeat {fw} {dev} a/b", s, a, b) for s in STEPS]
            if "cross" in args.cases and size in args.cross_sizes:
                ref = run(fw, size, "cpu-ref", "cpu")
                for s in STEPS:
                    src = str(step_dir(args.work, ref, s))
                    forced = run(
                        fw,
                        size,
                        f"{dev}-forced-{s}",
                        dev,
                        steps=(s,),
                        init_from=src,
                        force_from=src,
                        after=ref,
                    )
                    cases.append(Case(f"{size} cross {fw} cpu/{dev}", s, ref, forced, force=True))
    return list(runs.values()), cases


def step_dir(work: Path, run: str, step: int) -> Path:
    return work / "capture" / run / f"step_{step}"


def capture_cmd(args: argparse.Namespace, run: Run) -> list[str]:
    data = args.work / "data"
    cmd = [sys.executable, str(ROOT / f"scripts/capture_{run.framework}.py")]
    cmd += ["--config-path", str(ROOT / "config"), "--config-name", "nest_fast-conformer"]
    cmd += [
        f"model.train_ds.manifest_filepath={data}/train_manifest.json",
        f"model.train_ds.noise_manifest={data}/noise_manifest.json",
        f"model.validation_ds.manifest_filepath={data}/val_manifest.json",
        *size_overrides(run.size),
        f"trainer.accelerator={'gpu' if run.device == 'cuda' else 'cpu'}",
        "trainer.devices=1",
        f"output_dir={args.work / 'capture' / run.name}",
        f"seed={args.seed}",
        "save_steps=" + ",".join(map(str, run.steps)),
        f"threads={args.threads}",
        "deterministic=true",
    ]
    cmd += [f"init_from={run.init_from}"] if run.init_from else []
    cmd += [f"force_from={run.force_from}"] if run.force_from else []
    return cmd


def compare_cmd(args: argparse.Namespace, case: Case) -> list[str]:
    cmd = [sys.executable, str(ROOT / "scripts/compare.py")]
    cmd += ["--ref", str(step_dir(args.work, case.ref, case.step))]
    cmd += ["--cand", str(step_dir(args.work, case.cand, case.step))]
    tol = tolerances()
    cmd += ["--tolerances", json.dumps(tol, sort_keys=True)] if tol else []
    cmd += ["--force"] if case.force else []
    return cmd + ["--out", str(pickle_path(args.work, case))]


def pickle_path(work: Path, case: Case) -> Path:
    return work / "compare" / (case.name.replace(" ", "_").replace("/", "-") + f"_{case.step}.pkl")


def execute(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[float, str]:
    """Run one process into its log; (seconds, error or '')."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as fh:
        fh.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        fh.flush()
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout
            )
            error = f"exit {proc.returncode}" if proc.returncode else ""
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout:.0f} s"
    seconds = time.monotonic() - start
    if error:
        lines = log.read_text(errors="replace").strip().splitlines()
        error += f" ({log}): {lines[-1] if lines else ''}"
    return seconds, error


def run_captures(args, runs: list[Run], envs: dict[str, dict[str, str]]) -> None:
    """Every capture, args.jobs at a time; a run that starts from another waits for it."""
    by_name = {r.name: r for r in runs}
    pending = list(runs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures: dict[concurrent.futures.Future, Run] = {}
        while pending or futures:
            for run in list(pending):
                dep = by_name.get(run.after) if run.after else None
                if dep is not None and dep.seconds is None and dep.error is None:
                    continue
                pending.remove(run)
                if dep is not None and dep.error:
                    run.error = f"its reference {dep.name} failed"
                    continue
                log = args.work / "logs" / f"{run.name}.log"
                cmd = capture_cmd(args, run)
                futures[pool.submit(execute, cmd, envs[run.device], log, args.timeout)] = run
            done, _ = concurrent.futures.wait(futures, return_when="FIRST_COMPLETED")
            for fut in done:
                run = futures.pop(fut)
                seconds, error = fut.result()
                run.seconds, run.error = (seconds, None) if not error else (None, error)
                status = f"{seconds:.1f} s" if not error else f"FAILED {error}"
                print(f"# capture {run.name}: {status}", flush=True)


def run_compares(args, cases: list[Case], runs: list[Run], env: dict[str, str]) -> None:
    from nestalign.summary import load_result

    by_name = {r.name: r for r in runs}

    def one(case: Case) -> None:
        failed = [n for n in (case.ref, case.cand) if by_name[n].error]
        if failed:
            case.error = "capture failed: " + ", ".join(failed)
            return
        log = args.work / "logs" / "compare" / (pickle_path(args.work, case).stem + ".log")
        case.seconds, case.error = execute(compare_cmd(args, case), env, log, args.timeout)
        if not case.error:
            case.result = load_result(pickle_path(args.work, case))

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, cases))


def _fmt(value) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.3g}"


def case_line(case: Case, runs: dict[str, Run]) -> str:
    head = f"{case.name} step {case.step}"
    if case.error:
        return f"{head:<34} ERROR  {case.error}"
    r = case.result
    verdict = {"pass": "PASS", "fail": "FAIL", "nonfinite": "NONFINITE"}.get(r["verdict"], "ERROR")
    cats = r.get("categories") or {}
    figures = " ".join(
        f"{cat}={_fmt(((cats.get(cat) or {}).get('worst') or {}).get('max_abs'))}"
        for cat in CATEGORIES
    )
    ref, cand = runs[case.ref].seconds, runs[case.cand].seconds
    seconds = f"s={ref:.1f}+{cand:.1f}+{case.seconds:.1f}"
    line = f"{head:<34} {verdict:<9} {figures} {seconds}"
    errors = r.get("errors") or []
    return line + (f" error: {errors[0].get('error')}" if errors else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--sizes", default=",".join(SIZES), help="tiny,full")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="nemo,nest")
    parser.add_argument("--cases", default=",".join(CASES), help="parity,repeat,cross")
    parser.add_argument("--cross-sizes", default="tiny", help="sizes of the CPU vs GPU cases")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per capture")
    parser.add_argument("--jobs", type=int, default=None, help="processes at once (cuda 4, cpu 1)")
    parser.add_argument("--timeout", type=float, default=420, help="seconds per process")
    parser.add_argument("--work", type=Path, default=Path("/tmp/nest-align-gpu-check"))
    parser.add_argument("--wheels", type=Path, default=WHEELS, help="wheel folder to install")
    parser.add_argument("--site", type=Path, help="install target (default WORK/site)")
    parser.add_argument("--keep", action="store_true", help="keep the captures (full size: GBs)")
    parser.add_argument("--strict", action="store_true", help="exit 1 unless every case passes")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--download-wheels", type=Path, metavar="DIR", help="fill DIR, then exit")
    args = parser.parse_args(argv)
    if args.download_wheels:
        return download_wheels(args.download_wheels)
    for key, allowed in (("sizes", SIZES), ("frameworks", FRAMEWORKS), ("cases", CASES)):
        values = [v for v in getattr(args, key).split(",") if v]
        if not values or set(values) - set(allowed):
            parser.error(f"--{key}: a comma-separated subset of {','.join(allowed)}")
        setattr(args, key, values)
    args.cross_sizes = args.cross_sizes.split(",")
    args.work = args.work.resolve()
    args.jobs = args.jobs or (4 if args.device == "cuda" else 1)
    site = (args.site or args.work / "site").resolve()
    started = time.monotonic()

    installed = install_wheels(args.wheels, site, args.dry_run)
    site_path = site if installed else None
    envs = {d: child_env(site_path, d) for d in ("cpu", args.device)}
    runs, cases = plan(args)
    data_cmd = [sys.executable, str(ROOT / "scripts/make_data.py")]
    data_cmd += ["--config", str(SIZE_CONFIGS["tiny"]), "--out", str(args.work / "data")]
    if args.dry_run:
        print(f"# PYTHONPATH={envs[args.device]['PYTHONPATH']}")
        _echo(data_cmd)
        for run in runs:
            _echo(capture_cmd(args, run))
        for case in cases:
            print(f"# case {case.name} step {case.step}")
            _echo(compare_cmd(args, case))
        return 0
    print("#", preflight(args.frameworks, args.device, envs[args.device]), flush=True)
    for old in ("capture", "compare"):
        shutil.rmtree(args.work / old, ignore_errors=True)
    seconds, error = execute(data_cmd, envs["cpu"], args.work / "logs/make_data.log", 120)
    if error:
        raise SystemExit(f"make_data failed: {error}")
    sys.path[:0] = [str(ROOT / "src"), *([str(site_path)] if site_path else [])]
    by_name = {r.name: r for r in runs}
    for size in args.sizes:  # size by size: the full-size captures take GBs of disk
        size_runs = [r for r in runs if r.size == size]
        run_captures(args, size_runs, envs)
        size_cases = [c for c in cases if c.name.startswith(f"{size} ")]
        run_compares(args, size_cases, size_runs, envs[args.device])
        for case in size_cases:
            print(case_line(case, by_name), flush=True)
        if not args.keep:
            shutil.rmtree(args.work / "capture" / size, ignore_errors=True)
    verdicts = [c.result.get("verdict") if not c.error else "error" for c in cases]
    print(
        f"# {len(cases)} cases, {verdicts.count('pass')} pass, "
        f"{time.monotonic() - started:.0f} s in all; logs in {args.work / 'logs'}",
        flush=True,
    )
    if "error" in verdicts or any(c.result.get("errors") for c in cases):
        return 1
    return 1 if args.strict and set(verdicts) != {"pass"} else 0


if __name__ == "__main__":
    raise SystemExit(main())
