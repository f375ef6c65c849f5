"""AdamW and the Noam learning-rate schedule, configured from ``model.optim`` as NeMo does it.

One parameter group holds every parameter of the model, frozen ones included (they get no
gradient, so AdamW leaves them alone). The schedule follows NeMo's ``NoamAnnealing``: the torch
scheduler constructor already takes one step, so optimizer steps 1 and 2 both use ``s = 1``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

OPTIMIZERS = {"adamw": torch.optim.AdamW}
SCHEDULERS = ("NoamAnnealing",)
#: Keys of ``optim`` that are passed on to the optimizer.
OPTIM_ARGS = ("betas", "weight_decay", "eps", "amsgrad")
#: Keys of ``optim.sched`` besides ``name``.
SCHED_KEYS = (
    "d_model",
    "warmup_steps",
    "warmup_ratio",
    "min_lr",
    "max_steps",
    "last_epoch",
    "monitor",
)


class NoamAnnealing(LRScheduler):
    """``lr = base_lr * d_model^-0.5 * min(s^-0.5, s * warmup^-1.5)``, ``s = max(1, step)``.

    Without warmup the factor is ``s^-0.5``; after warmup the rate never drops below ``min_lr``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        d_model: int,
        warmup_steps: int | None = None,
        warmup_ratio: float | None = None,
        max_steps: int | None = None,
        min_lr: float = 0.0,
        last_epoch: int = -1,
    ):
        if warmup_steps is not None and warmup_ratio is not None:
            raise ValueError("optim.sched: give warmup_steps or warmup_ratio, not both")
        if warmup_ratio is not None and max_steps is None:
            raise ValueError("optim.sched: warmup_ratio needs max_steps")
        self._normalize = d_model ** (-0.5)
        self.max_steps = max_steps
        if warmup_steps is not None:
            self.warmup_steps = warmup_steps
        elif warmup_ratio is not None:
            self.warmup_steps = int(warmup_ratio * max_steps)
        else:
            self.warmup_steps = 0
        self.min_lr = min_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        step = max(1, self.last_epoch)
        for base in self.base_lrs:
            if base < self.min_lr:
                raise ValueError(f"optim.lr {base} is below optim.sched.min_lr {self.min_lr}")
        return [self.lr_at(base, step) for base in self.base_lrs]

    def lr_at(self, base_lr: float, step: int) -> float:
        if self.warmup_steps > 0:
            factor = self._normalize * min(step ** (-0.5), step * (self.warmup_steps ** (-1.5)))
        else:
            factor = self._normalize * step ** (-0.5)
        lr = base_lr * factor
        return max(lr, self.min_lr) if step > self.warmup_steps else lr


def compute_max_steps(
    max_epochs: int,
    accumulate_grad_batches: int,
    limit_train_batches: int | float,
    num_workers: int,
    num_samples: int,
    batch_size: int,
    drop_last: bool,
) -> int:
    """Total optimizer steps of a run bounded by epochs (NeMo's formula)."""
    rounding = math.floor if drop_last else math.ceil
    per_device = math.ceil(num_samples / max(1, num_workers))
    steps = rounding(per_device / batch_size)
    if isinstance(limit_train_batches, int) or limit_train_batches == 0.0:
        steps = min(steps, int(limit_train_batches))
    elif steps != float("inf"):
        steps = int(steps * limit_train_batches)
    return math.ceil(steps / accumulate_grad_batches) * max_epochs


def build_optimizer(
    params: list[torch.nn.Parameter], optim_cfg: dict[str, Any]
) -> torch.optim.Optimizer:
    """The optimizer named in ``optim.name`` over one group holding ``params``."""
    name = optim_cfg.get("name") or "adam"
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name {name!r} is not supported; supported: {sorted(OPTIMIZERS)}")
    unknown = sorted(set(optim_cfg) - {"name", "lr", "sched", *OPTIM_ARGS})
    if unknown:
        raise ValueError(f"optim keys not supported: {unknown}")
    kwargs = {k: optim_cfg[k] for k in OPTIM_ARGS if k in optim_cfg}
    if optim_cfg.get("lr") is not None:
        kwargs["lr"] = optim_cfg["lr"]
    return OPTIMIZERS[name]([{"params": params}], **kwargs)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    sched_cfg: dict[str, Any] | None,
    max_steps: int | None,
) -> dict[str, Any] | None:
    """The Lightning scheduler dict for ``optim.sched``, or None when NeMo would create none.

    ``max_steps`` is the run's step count (see :func:`compute_max_steps`); None means it cannot
    be known (no training data), and then, as in NeMo, there is no scheduler.
    """
    if sched_cfg is None:
        return None
    name = sched_cfg.get("name")
    if name not in SCHEDULERS:
        raise ValueError(
            f"optim.sched.name {name!r} is not supported; supported: {list(SCHEDULERS)}"
        )
    unknown = sorted(set(sched_cfg) - {"name", *SCHED_KEYS})
    if unknown:
        raise ValueError(f"optim.sched keys not supported: {unknown}")
    if sched_cfg.get("max_steps") is not None:
        max_steps = sched_cfg["max_steps"]
        if max_steps == -1:
            return None
        if max_steps < 0:
            raise ValueError(f"optim.sched.max_steps must be >= 0 or -1, got {max_steps}")
    if max_steps is None:
        return None
    if sched_cfg.get("d_model") is None:
        raise ValueError("optim.sched.d_model is required by NoamAnnealing")
    keys = ("d_model", "warmup_steps", "warmup_ratio", "min_lr", "last_epoch")
    args = {k: sched_cfg[k] for k in keys if k in sched_cfg}
    scheduler = NoamAnnealing(optimizer, max_steps=max_steps, **args)
    return {
        "scheduler": scheduler,
        "interval": "step",
        "frequency": 1,
        "monitor": sched_cfg.get("monitor", "loss"),
        "reduce_on_plateau": False,
    }
