"""AdamW and NoamAnnealing as the port configures them from ``model.optim``.

Expected learning rates are NeMo 3.0.0's own (printed by its NoamAnnealing with lr 5, d_model 512,
warmup 25000); the slow test recomputes a long run of them in the nemo env.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_python
from nest_ssl.optim import NoamAnnealing, build_optimizer, build_scheduler, compute_max_steps

OPTIM = {"name": "adamw", "lr": 5.0, "betas": [0.9, 0.98], "weight_decay": 1e-3}
SCHED = {
    "name": "NoamAnnealing",
    "d_model": 512,
    "warmup_steps": 25000,
    "warmup_ratio": None,
    "min_lr": 1e-6,
}


def lrs(sched: dict, steps: int, max_steps: int = 100, lr: float = 5.0) -> list[float]:
    """The lr each of the first ``steps`` optimizer steps uses, as Lightning drives it."""
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer(params, {**OPTIM, "lr": lr})
    scheduler = build_scheduler(opt, sched, max_steps)["scheduler"]
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return out


def test_steps_one_and_two_share_the_first_rate():
    first = lrs(SCHED, 3)
    assert first == [5.590169943749475e-08, 5.590169943749475e-08, 1.118033988749895e-07]


def test_peak_and_decay_values():
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], OPTIM)
    noam = build_scheduler(opt, SCHED, 10)["scheduler"]
    assert noam.lr_at(5.0, 25000) == 0.0013975424859373688
    assert noam.lr_at(5.0, 100000) == pytest.approx(6.988e-04, rel=1e-3)
    assert noam.lr_at(1e-3, 10**9) == 1e-6  # min_lr floor after warmup


def test_scheduler_dict_for_lightning_and_no_scheduler_cases():
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], OPTIM)
    d = build_scheduler(opt, SCHED, 7)
    assert isinstance(d["scheduler"], NoamAnnealing) and d["scheduler"].max_steps == 7
    assert {k: v for k, v in d.items() if k != "scheduler"} == {
        "interval": "step",
        "frequency": 1,
        "monitor": "loss",
        "reduce_on_plateau": False,
    }
    assert build_scheduler(opt, SCHED, None) is None  # no train data: constant lr
    assert build_scheduler(opt, {**SCHED, "max_steps": -1}, 7) is None
    assert build_scheduler(opt, None, 7) is None


def test_warmup_ratio_and_no_warmup():
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], OPTIM)
    sched = {**SCHED, "warmup_steps": None, "warmup_ratio": 0.1}
    assert build_scheduler(opt, sched, 1000)["scheduler"].warmup_steps == 100
    none = {**SCHED, "warmup_steps": None}
    assert build_scheduler(opt, none, 10)["scheduler"].lr_at(5.0, 4) == 5.0 * (512**-0.5 * 0.5)
    with pytest.raises(ValueError, match="not both"):
        build_scheduler(opt, {**SCHED, "warmup_ratio": 0.1}, 10)


def test_one_group_with_every_parameter_and_adamw_settings():
    frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    params = [torch.nn.Parameter(torch.zeros(2)), frozen]
    opt = build_optimizer(params, OPTIM)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert [id(p) for p in group["params"]] == [id(p) for p in params]
    assert tuple(group["betas"]) == (0.9, 0.98)
    assert (group["lr"], group["weight_decay"], group["eps"]) == (5.0, 1e-3, 1e-8)


@pytest.mark.parametrize(
    "optim,message",
    [
        ({**OPTIM, "name": "adam"}, "optim.name 'adam' is not supported"),
        ({**OPTIM, "momentum": 0.9}, r"optim keys not supported: \['momentum'\]"),
    ],
)
def test_unsupported_optimizers_are_rejected(optim, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], optim)


@pytest.mark.parametrize(
    "sched,message",
    [
        ({**SCHED, "name": "CosineAnnealing"}, "optim.sched.name 'CosineAnnealing'"),
        ({**SCHED, "hold_steps": 3}, r"optim.sched keys not supported: \['hold_steps'\]"),
    ],
)
def test_unsupported_schedules_are_rejected(sched, message):
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], OPTIM)
    with pytest.raises(ValueError, match=message):
        build_scheduler(opt, sched, 10)


def test_lr_below_min_lr_raises():
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], {**OPTIM, "lr": 1e-7})
    with pytest.raises(ValueError, match="below optim.sched.min_lr"):
        build_scheduler(opt, SCHED, 10)


def test_max_steps_from_epochs():
    # 10 samples, batch 4, drop_last: 2 steps per epoch, 3 epochs
    assert compute_max_steps(3, 1, 1.0, 1, 10, 4, True) == 6
    assert compute_max_steps(3, 1, 1.0, 1, 10, 4, False) == 9
    assert compute_max_steps(3, 2, 1, 1, 10, 4, False) == 3
    assert compute_max_steps(1, 1, 0.5, 2, 40, 4, True) == 2


NEMO_LRS = r"""
import json, sys, torch
from nemo.core.optim.lr_scheduler import NoamAnnealing
from nemo.core.optim.lr_scheduler import compute_max_steps
p = [torch.nn.Parameter(torch.zeros(2))]
out = {}
for name, kw in json.loads(sys.argv[1]).items():
    o = torch.optim.AdamW(p, lr=kw.pop("lr"))
    s = NoamAnnealing(o, **kw)
    lrs = []
    for _ in range(300):
        lrs.append(o.param_groups[0]["lr"]); o.step(); s.step()
    out[name] = lrs + [s._noam_annealing(5.0, 25000), s._noam_annealing(5.0, 77777)]
out["max_steps"] = compute_max_steps(3, 2, 0.5, 2, 41, 4, True)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_rates_match_nemo_for_300_steps():
    cases = {
        "default": {"lr": 5.0, "d_model": 512, "warmup_steps": 25000, "min_lr": 1e-6},
        "short": {"lr": 0.5, "d_model": 64, "warmup_steps": 40, "min_lr": 1e-4},
        "ratio": {"lr": 5.0, "d_model": 176, "warmup_ratio": 0.2, "max_steps": 200},
    }
    proc = run_python("nemo", ["-c", NEMO_LRS, json.dumps(cases)])
    ref = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, kw in cases.items():
        kw = dict(kw)
        lr = kw.pop("lr")
        sched = {"name": "NoamAnnealing", **kw}
        max_steps = kw.get("max_steps", 100)
        opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], OPTIM)
        noam = build_scheduler(opt, sched, max_steps)["scheduler"]
        tail = [noam.lr_at(5.0, 25000), noam.lr_at(5.0, 77777)]
        assert lrs(sched, 300, max_steps, lr) + tail == ref[name], name
    assert compute_max_steps(3, 2, 0.5, 2, 41, 4, True) == ref["max_steps"]
