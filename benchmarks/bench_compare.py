"""Throughput and peak memory of compare_steps on synthetic captures of NEST's shape.

python benchmarks/bench_compare.py --size tiny full [--threads 1] [--dir DIR]

For each size it writes a reference step directory with a FastConformer-like state_dict
(tiny: 2 layers, d_model 64, ~0.9 M parameters; full: 17 layers, d_model 512, ~113 M), its
gradients, a batch, a forward output and module calls with inputs, outputs and output gradients,
then three candidates: every float element perturbed by 1e-6 relative (within tolerance: all
metrics do their full work), by 1e-3 (everything fails: the divergence walk runs too), and an
identical one. Each comparison runs in a fresh process; it prints the throughput (GB/s of tensor
file bytes, both sides counted, warm page cache), the peak RSS of that process, and the peak RSS
over the process's RSS after its imports, against the largest single artifact file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from nestalign import artifacts as art  # noqa: E402

SIZES = {
    "tiny": {"layers": 2, "d": 64, "sub": 64, "frames": 100},
    "full": {"layers": 17, "d": 512, "sub": 256, "frames": 200},
}
FEATS, VOCAB, KERNEL, BATCH = 80, 8192, 9, 2


def state_dict(layers: int, d: int, sub: int) -> dict[str, torch.Tensor]:
    """Parameters with the shapes of a FastConformer encoder plus NEST's decoder."""
    g = torch.Generator().manual_seed(0)
    shapes = {
        "encoder.pre_encode.conv.0.weight": (sub, 1, 3, 3),
        "encoder.pre_encode.conv.0.bias": (sub,),
        "encoder.pre_encode.conv.2.weight": (sub, 1, 3, 3),
        "encoder.pre_encode.conv.3.weight": (sub, sub, 1, 1),
        "encoder.pre_encode.conv.5.weight": (sub, 1, 3, 3),
        "encoder.pre_encode.conv.6.weight": (sub, sub, 1, 1),
        "encoder.pre_encode.out.weight": (d, sub * (FEATS // 8)),
        "encoder.pre_encode.out.bias": (d,),
    }
    for i in range(layers):
        p = f"encoder.layers.{i}."
        for ff in ("feed_forward1", "feed_forward2"):
            shapes[p + f"{ff}.linear1.weight"] = (4 * d, d)
            shapes[p + f"{ff}.linear2.weight"] = (d, 4 * d)
        for proj in ("linear_q", "linear_k", "linear_v", "linear_out", "linear_pos"):
            shapes[p + f"self_attn.{proj}.weight"] = (d, d)
        shapes[p + "conv.pointwise_conv1.weight"] = (2 * d, d, 1)
        shapes[p + "conv.depthwise_conv.weight"] = (d, 1, KERNEL)
        shapes[p + "conv.pointwise_conv2.weight"] = (d, d, 1)
        for norm in (
            "norm_feed_forward1",
            "norm_self_att",
            "norm_conv",
            "norm_feed_forward2",
            "norm_out",
            "conv.batch_norm",
        ):
            shapes[p + f"{norm}.weight"] = (d,)
            shapes[p + f"{norm}.bias"] = (d,)
    shapes["decoder.decoder_layers.0.weight"] = (VOCAB, d)
    shapes["decoder.decoder_layers.0.bias"] = (VOCAB,)
    return {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}


def calls(layers: int, d: int, frames: int) -> list[dict]:
    """Module calls in start order: each layer and its six blocks, with output gradients."""
    g = torch.Generator().manual_seed(1)
    out: list[dict] = []
    end = 0

    def act() -> torch.Tensor:
        return torch.randn(BATCH, frames, d, generator=g)

    def call(name: str, parent: str | None) -> dict:
        entry = {
            "name": name,
            "call": 0,
            "type": "Module",
            "parent": parent,
            "start": len(out),
            "end": -1,
            "input_names": ["x"],
            "inputs": [act()],
            "outputs": act(),
            "grad_outputs": [act()],
        }
        out.append(entry)
        return entry

    def close(entry: dict) -> None:
        nonlocal end
        entry["end"] = end
        end += 1

    for i in range(layers):
        layer = call(f"encoder.layers.{i}", "encoder")
        for block in ("feed_forward1", "self_attn", "conv", "feed_forward2", "norm_out"):
            close(call(f"encoder.layers.{i}.{block}", layer["name"]))
        close(layer)
    return out


def write_step(run: Path, params, layer_calls, batch, forward, perturb: float) -> Path:
    def p(t):
        if perturb == 0 or not t.is_floating_point():
            return t
        return t * (1 + perturb * torch.randn(t.shape, generator=torch.Generator().manual_seed(2)))

    def tree(x):
        if isinstance(x, torch.Tensor):
            return p(x)
        if isinstance(x, dict):
            return {k: tree(v) for k, v in x.items()}
        if isinstance(x, list):
            return [tree(v) for v in x]
        return x

    w = art.StepWriter(run, 0)
    w.json(art.METADATA, {"framework": run.name, "seed": 0, "step": 0})
    w.json(
        art.STRUCTURE,
        {
            "entries": [
                {
                    "name": n,
                    "kind": "parameter",
                    "shape": list(t.shape),
                    "dtype": "float32",
                    "requires_grad": True,
                }
                for n, t in params.items()
            ]
        },
    )
    w.tensors(art.BATCH, tree(batch))
    w.tensors(art.FORWARD, tree(forward))
    w.tensors(art.LOSS, p(torch.tensor(7.0)))
    w.tensors(art.GRADS, tree(params))
    w.tensors(art.WEIGHTS, tree(params))
    w.tensors(art.LAYERS, tree(layer_calls))
    return w.commit()


def build(size: str, root: Path) -> tuple[Path, ...]:
    cfg = SIZES[size]
    params = state_dict(cfg["layers"], cfg["d"], cfg["sub"])
    layer_calls = calls(cfg["layers"], cfg["d"], cfg["frames"])
    g = torch.Generator().manual_seed(3)
    batch = {
        "audio": torch.randn(BATCH, 16000 * 8, generator=g),
        "audio_len": torch.tensor([128000, 120000]),
    }
    forward = {
        "log_probs": torch.randn(BATCH, cfg["frames"], VOCAB, generator=g),
        "masks": torch.rand(BATCH, cfg["frames"], FEATS, generator=g) > 0.5,
    }
    n = sum(t.numel() for t in params.values())
    print(f"{size}: {n / 1e6:.1f} M parameters, {len(layer_calls)} module calls", flush=True)
    return tuple(
        write_step(root / f"{size}_{kind}", params, layer_calls, batch, forward, eps)
        for kind, eps in (("ref", 0.0), ("diff", 1e-6), ("fail", 1e-3), ("same", 0.0))
    )


def _status(field: str) -> int:
    """A memory figure of this process from /proc (VmHWM: peak resident set), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(ref: str, cand: str, threads: int, force: bool = False) -> None:
    """One compare_steps in this process: prints its seconds, peak and base RSS, verdict."""
    from nestalign.compare import compare_steps, load_tolerances

    torch.set_num_threads(threads)
    base = _status("VmRSS")
    t0 = time.perf_counter()
    result = compare_steps(ref, cand, load_tolerances(atol=1e-5, rtol=1e-5), force=force)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    print(
        json.dumps({"seconds": seconds, "peak": peak, "base": base, "verdict": result["verdict"]})
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", choices=sorted(SIZES), default=["tiny", "full"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the compare")
    parser.add_argument("--dir", help="where to write the synthetic captures (default: temp)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.threads)
        return 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for size in args.size:
            ref, diff, fail, same = build(size, Path(tmp))
            for label, cand in (
                ("every element differs, within tolerance", diff),
                ("every element differs, all fail", fail),
                ("identical", same),
            ):
                files = [d / f for d in (ref, cand) for f in art.TENSOR_FILES]
                total = sum(f.stat().st_size for f in files)
                largest = max(f.stat().st_size for f in files)
                proc = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--threads",
                        str(args.threads),
                        "--child",
                        str(ref),
                        str(cand),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                print(
                    f"  {size} {label}: {total / 1e9:.3f} GB in {r['seconds']:.2f} s = "
                    f"{total / r['seconds'] / 1e9:.2f} GB/s ({r['verdict']}); peak RSS "
                    f"{r['peak'] / 1e6:.0f} MB, {(r['peak'] - r['base']) / 1e6:.0f} MB over "
                    f"imports; largest artifact {largest / 1e6:.0f} MB "
                    f"(ratio {(r['peak'] - r['base']) / largest:.2f})",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
