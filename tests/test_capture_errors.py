"""What a capture refuses or warns about, each as one line, and what it leaves behind when it
fails: nothing that looks like a complete step (the issue's capture edge cases)."""

from __future__ import annotations

import re
import threading

import pytest
import torch
from hydra.errors import HydraException

import test_capture
from captures import ROOT, capture_argv, nest_capture
from nestalign import artifacts as art
from nestalign.runner import capture_main


def _main(argv: list[str]) -> int:
    from nest_ssl.training import NestPretraining

    return capture_main(argv, "nest", lambda cfg, tr: NestPretraining(cfg=cfg, trainer=tr), "t")


def test_gradient_accumulation_is_refused_before_training(tmp_path, data):
    argv = capture_argv(tmp_path / "run", data, "0", "trainer.accumulate_grad_batches=2")
    with pytest.raises(SystemExit, match=r"^trainer.accumulate_grad_batches=2: a capture records"):
        _main(argv)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_missing_gpu_is_one_line(tmp_path, data):
    argv = capture_argv(tmp_path / "run", data, "0", "trainer.accelerator=gpu")
    argv.remove("trainer.accelerator=cpu")
    with pytest.raises(SystemExit, match=r"^trainer.accelerator=gpu, but torch sees no GPU$"):
        _main(argv)


def test_a_wrong_hydra_key_is_one_line_unless_full_errors_are_asked(tmp_path, data, monkeypatch):
    argv = capture_argv(tmp_path / "run", data, "0", "model.encoder.nope=1")
    with pytest.raises(SystemExit) as exc:
        _main(argv)
    message = str(exc.value)
    assert message.startswith("config: Could not override 'model.encoder.nope'.")
    assert "\n" not in message and "Traceback" not in message
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(HydraException):
        _main(argv)


def test_cfg_job_prints_the_composed_config_and_captures_nothing(tmp_path, data, capsys):
    argv = ["--cfg", "job", *capture_argv(tmp_path / "run", data, "0", "model.optim.lr=0.5")]
    assert _main(argv) == 0
    out = capsys.readouterr().out
    assert "  optim:\n" in out and "    lr: 0.5\n" in out and "save_steps: 0\n" in out
    assert not (tmp_path / "run").exists()


def test_every_capture_keeps_its_composed_config(tmp_path, data):
    step = nest_capture(tmp_path / "run", data, steps="0")
    text = (step / art.CONFIG).read_text()
    assert "seed: 42\n" in text and f"output_dir: {tmp_path / 'run'}\n" in text
    assert "d_model: 64\n" in text  # model_overrides applied, interpolations resolved


@pytest.mark.parametrize("steps", ["0", "0,1,2"])
def test_a_failed_write_names_the_file_and_leaves_no_step(tmp_path, data, monkeypatch, steps):
    """The files are written on the writer thread: its error reaches the run at the next
    captured step or at the end of training, and no later step is written."""
    real_save = torch.save
    threads = set()

    def full_disk(obj, f, *args, **kwargs):
        threads.add(threading.current_thread().name)
        if getattr(f, "name", "").split("/")[-1].startswith(f".{art.LAYERS}."):
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as exc:
        _main(capture_argv(tmp_path / "run", data, steps))
    assert threads and all(name.startswith("capture-writer") for name in threads)
    message = str(exc.value)
    assert message.startswith(f"{tmp_path}/run/step_0/{art.LAYERS}: cannot be written ([enforce")
    assert list((tmp_path / "run").iterdir()) == []  # no step, no staging directory


def test_stale_staging_directories_are_removed(tmp_path):
    stale = tmp_path / ".step_0.killed"
    stale.mkdir()
    (stale / art.LOSS).write_bytes(b"half")
    other = tmp_path / ".step_1.killed"
    other.mkdir()
    writer = art.StepWriter(tmp_path, 0)
    writer.tensors(art.LOSS, torch.zeros(()))
    writer.commit()
    assert not stale.exists() and other.exists()  # only this step's leftovers


class NoForward(test_capture.LitNet):
    def training_step(self, batch, batch_idx):
        return self.net.head(batch["x"]).square().mean()  # bypasses forward()


def test_a_training_step_that_bypasses_forward_warns(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(test_capture, "LitNet", NoForward)
    test_capture.fit(tmp_path, steps=[0], max_steps=1)
    err = capsys.readouterr().err
    assert "warning: step 0: the forward output is empty (forward_output.pt holds" in err


def test_every_job_execs_its_python_so_a_killed_job_leaves_nothing_running():
    """The shell of a job is replaced by its python (`exec`): when Snakemake kills the job, the
    capture dies with it and cannot commit a step after the job was reported failed."""
    text = "\n".join(p.read_text() for p in sorted((ROOT / "rules").glob("*.smk")))
    commands = re.findall(r'shell:\s*\n\s*"([^"]*)', text)
    assert len(commands) >= 6, commands
    assert all(c.startswith("exec {params.python} ") for c in commands), commands
