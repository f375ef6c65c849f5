"""Side-by-side speed of NeMo's NEST and the nest port on the CPU.

    python benchmarks/bench_port.py [--threads 2] [--steps 10] [--full-steps 3] [--skip-full]

For each framework, in its own env (.venvs/nemo, .venvs/nest, or $NEST_ALIGN_<ENV>_PYTHON) and a
fresh process: the wall time of importing the model and building it (tiny config; NeMo's
``EncDecDenoiseMaskedTokenPredModel``, which also sets up its data loaders, against the port's
``nest_ssl.model.NestModel``), and the steady time (median and minimum) of one training step
(forward, loss, backward, AdamW step) on a fixed batch, at the tiny config and at the full
113 M-parameter config. Prints the figures and the ratios; targets: build at least 4x faster, step
time ratio (nest / NeMo) at most 1.0. The build is shown from process start and, since both sides
import the same torch first, after ``import torch``; a third process times the port's Lightning
module with its data loaders (``nest_ssl.training.NestPretraining``), for reference. On a shared
machine use ``--threads 1``: oversubscribed threads make the step times swing by an order of
magnitude.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
ENVS = {"nemo": "nemo", "nest": "nest", "nest-lightning": "nest"}
TINY = {
    "encoder.n_layers": 2,
    "encoder.d_model": 64,
    "encoder.n_heads": 4,
    "encoder.subsampling_conv_channels": 64,
}


def make_data(folder: Path) -> Path:
    """Four 16 kHz clips of 2-4 s and a manifest."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    lines = []
    for i, seconds in enumerate([2.0, 3.0, 3.5, 4.0]):
        sf.write(folder / f"a{i}.wav", 0.1 * rng.standard_normal(int(16000 * seconds)), 16000)
        lines.append(json.dumps({"audio_filepath": f"a{i}.wav", "duration": seconds}))
    (folder / "train.json").write_text("\n".join(lines) + "\n")
    return folder / "train.json"


def worker(framework: str, size: str, manifest: str, threads: int, steps: int) -> dict:
    """Runs inside a framework env: times import+build, then (steps > 0) the training step."""
    import torch

    after_torch = time.perf_counter()
    torch.set_num_threads(threads)
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "config" / "nest_fast-conformer.yaml")
    for key, value in (TINY if size == "tiny" else {}).items():
        OmegaConf.update(cfg.model, key, value)
    for ds in ("train_ds", "validation_ds"):
        OmegaConf.update(cfg.model, f"{ds}.manifest_filepath", manifest)
        OmegaConf.update(cfg.model, f"{ds}.num_workers", 0)
    OmegaConf.update(cfg.model, "train_ds.batch_size", 2)
    OmegaConf.update(cfg.model, "train_ds.shuffle", False)
    torch.manual_seed(0)
    if framework == "nemo":
        from nemo.collections.asr.models.ssl_models import EncDecDenoiseMaskedTokenPredModel

        model = EncDecDenoiseMaskedTokenPredModel(cfg=cfg.model)
        loader = model.train_dataloader()
    elif framework == "nest":
        from nest_ssl.model import NestModel

        model = NestModel(cfg.model)
    else:
        from nest_ssl.training import NestPretraining

        model = NestPretraining(cfg.model)
        loader = model.train_dataloader()
    built = time.perf_counter() - T0
    result = {"build_s": built, "build_after_torch_s": built - (after_torch - T0)}
    if steps == 0:
        return result
    if framework == "nest":
        from nest_ssl.config import validate_model_config
        from nest_ssl.training import build_dataloader

        data = validate_model_config(cfg.model)
        loader = build_dataloader(data["train_ds"], data["sample_rate"])
    batch = next(iter(loader))
    params = sum(p.numel() for p in model.parameters())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98))
    times = []
    for _ in range(steps + 2):  # two warm-up steps
        audio, noisy = batch.audio.clone(), batch.noisy_audio.clone()
        start = time.perf_counter()
        log_probs, enc_len, masks, tokens = model.forward(
            input_signal=audio,
            input_signal_length=batch.audio_len,
            noise_signal=batch.noise,
            noise_signal_length=batch.noise_len,
            noisy_input_signal=noisy,
            noisy_input_signal_length=batch.noisy_audio_len,
            apply_mask=True,
        )
        loss = model.loss(
            masks=masks, decoder_outputs=log_probs, targets=tokens, decoder_lengths=enc_len
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    steady = sorted(times[2:])
    return {
        **result,
        "step_s": steady[len(steady) // 2],
        "step_min_s": steady[0],
        "params": params,
    }


def env_python(env: str) -> str:
    return os.environ.get(
        f"NEST_ALIGN_{env.upper()}_PYTHON", str(ROOT / ".venvs" / env / "bin" / "python")
    )


def run(framework: str, size: str, manifest: Path, threads: int, steps: int) -> dict:
    cmd = [env_python(ENVS[framework]), __file__, "--worker", framework, size, str(manifest)]
    cmd += ["--threads", str(threads), "--steps", str(steps)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{framework} {size} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--steps", type=int, default=10, help="timed steps, tiny config")
    parser.add_argument("--full-steps", type=int, default=3, help="timed steps, full config")
    parser.add_argument("--skip-full", action="store_true", help="tiny config only")
    parser.add_argument(
        "--worker", nargs=3, metavar=("FW", "SIZE", "MANIFEST"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        fw, size, manifest = args.worker
        print(json.dumps(worker(fw, size, manifest, args.threads, args.steps)))
        return 0
    sizes = [("tiny", args.steps)] + ([] if args.skip_full else [("full", args.full_steps)])
    results: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_data(Path(tmp))
        for size, steps in sizes:
            for fw in ("nemo", "nest"):
                results[fw, size] = run(fw, size, manifest, args.threads, steps)
                print(f"{fw:5s} {size:5s} {json.dumps(results[fw, size])}", file=sys.stderr)
        results["nest-lightning", "tiny"] = run("nest-lightning", "tiny", manifest, args.threads, 0)
        print(
            f"nest-lightning tiny {json.dumps(results['nest-lightning', 'tiny'])}", file=sys.stderr
        )
    print(f"threads={args.threads}")
    print("| figure | NeMo | nest | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    nemo = results["nemo", "tiny"]
    for fw, what, target in (
        ("nest", "NestModel", ">= 4x"),
        ("nest-lightning", "NestPretraining", "-"),
    ):
        nest = results[fw, "tiny"]
        for key, label in (
            ("build_s", "import+build"),
            ("build_after_torch_s", "same, after torch"),
        ):
            ratio = nemo[key] / nest[key]
            print(
                f"| {label} (tiny), nest {what}, s | {nemo[key]:.2f} | {nest[key]:.2f} | "
                f"NeMo/nest {ratio:.1f}x | {target} |"
            )
    for size, _ in sizes:
        nemo, nest = results["nemo", size], results["nest", size]
        for key, label in (("step_s", "median"), ("step_min_s", "min")):
            ratio = nest[key] / nemo[key]
            print(
                f"| step {size} ({nest['params'] / 1e6:.1f} M params), {label}, s | "
                f"{nemo[key]:.4f} | {nest[key]:.4f} | nest/NeMo {ratio:.2f} | <= 1.0 |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
