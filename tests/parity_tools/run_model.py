"""Build NEST (NeMo's or the nest port) for a seed and dump what it computes, for parity tests.

Runs in the nemo env (``--framework nemo``) or the nest env (``--framework nest``) and writes
``OUT/weights.pt`` (initial state_dict, in order), ``OUT/structure.pt`` and, unless
``--weights-only``, ``OUT/train.pt`` (one recorded train-mode forward with masking, the loss and
its backward) and ``OUT/eval.pt`` (one recorded eval-mode forward). The batch is synthetic and
made from its own generator, so both frameworks see the same one.

    python tests/parity_tools/run_model.py --framework nest --out DIR [--seed 0] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nestalign.artifacts import save_tensors, to_plain
from nestalign.capture import LayerRecorder, model_structure

CONFIG = Path(__file__).resolve().parents[2] / "config" / "nest_fast-conformer.yaml"


def build(framework: str, overrides: list[str], seed: int) -> torch.nn.Module:
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG), OmegaConf.from_dotlist(overrides))
    for key in ("train_ds", "validation_ds"):
        cfg.model.pop(key)
    OmegaConf.resolve(cfg)
    torch.manual_seed(seed)
    if framework == "nemo":
        from nemo.collections.asr.models.ssl_models import EncDecDenoiseMaskedTokenPredModel

        return EncDecDenoiseMaskedTokenPredModel(cfg.model)
    from nest_ssl.model import NestModel

    return NestModel(cfg.model)


def make_batch(seed: int, seconds: list[float], noisy_cut: int) -> dict[str, torch.Tensor]:
    """Random speech-like audio (B, L), lengths, and noisy audio whose last length is shorter."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([int(s * 16000) for s in seconds], dtype=torch.int64)
    audio = torch.zeros(len(seconds), int(lengths.max()))
    for i, n in enumerate(lengths.tolist()):
        tone = torch.sin(torch.arange(n) * (0.01 + 0.05 * i)) * 0.3
        audio[i, :n] = tone + 0.05 * torch.randn(n, generator=g)
    noise = 0.02 * torch.randn(audio.shape, generator=g)
    noisy_len = lengths.clone()
    noisy_len[-1] -= noisy_cut
    return {
        "audio": audio,
        "audio_len": lengths,
        "noise": noise,
        "noise_len": lengths.clone(),
        "noisy_audio": audio + noise,
        "noisy_audio_len": noisy_len,
    }


def recorded_step(model, batch: dict[str, torch.Tensor], seed: int, train: bool) -> dict:
    """One forward (and backward in train mode) under a LayerRecorder; inputs are cloned."""
    model.train(train)
    for name in ("quantizer", "mask_processor"):  # frozen modules stay in eval, as in NeMo
        getattr(model, name).eval()
    model.zero_grad(set_to_none=True)
    rec = LayerRecorder(model, grads=train)
    b = {k: v.clone() for k, v in batch.items()}
    torch.manual_seed(seed)
    rec.start()
    with torch.set_grad_enabled(train):
        log_probs, encoded_len, masks, tokens = model(
            input_signal=b["audio"],
            input_signal_length=b["audio_len"],
            noise_signal=b["noise"],
            noise_signal_length=b["noise_len"],
            noisy_input_signal=b["noisy_audio"],
            noisy_input_signal_length=b["noisy_audio_len"],
            apply_mask=True,
        )
        loss = model.loss(
            masks=masks, decoder_outputs=log_probs, targets=tokens, decoder_lengths=encoded_len
        )
        if train:
            loss.backward()
    rec.stop()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    calls = [
        {k: c[k] for k in ("name", "call", "input_names", "inputs", "outputs", "grad_outputs")}
        for c in rec.calls
    ]
    outputs = {
        "log_probs": log_probs,
        "encoded_len": encoded_len,
        "masks": masks,
        "tokens": tokens,
        "loss": loss,
    }
    return {
        "outputs": to_plain(outputs),
        "grads": to_plain(grads),
        "calls": calls,
        "batch_after": to_plain(b),
        "buffers": to_plain(dict(model.named_buffers())),
    }


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--framework", choices=["nemo", "nest"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", default="4.0,3.3,2.5", help="comma-separated utterance lengths")
    ap.add_argument("--weights-only", action="store_true")
    ap.add_argument("--no-train", action="store_true", help="skip the train-mode step")
    ap.add_argument("overrides", nargs="*", help="dotlist overrides of the yaml")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model = build(args.framework, args.overrides, args.seed)
    save_tensors(out / "weights.pt", {k: v.clone() for k, v in model.state_dict().items()})
    save_tensors(out / "structure.pt", model_structure(model))
    if args.weights_only:
        return
    batch = make_batch(args.seed, [float(s) for s in args.seconds.split(",")], noisy_cut=3217)
    save_tensors(out / "eval.pt", recorded_step(model, batch, args.seed + 1, train=False))
    if not args.no_train:
        save_tensors(out / "train.pt", recorded_step(model, batch, args.seed + 2, train=True))


if __name__ == "__main__":
    main(sys.argv[1:])
