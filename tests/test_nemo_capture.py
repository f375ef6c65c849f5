"""Real NeMo captures: the same seed twice gives the same bytes, another seed does not,
and the compare says so."""

from __future__ import annotations

import pytest
import yaml

from conftest import ROOT, run_python
from nestalign import artifacts as art
from nestalign.compare.reader import StepSource
from nestalign.dummy_data import make_data
from nestalign.summary import load_result

pytestmark = pytest.mark.slow

CONFIG = yaml.safe_load((ROOT / "config/config.yaml").read_text())
DATA = {
    **CONFIG["data"],
    "train": {"count": 4, "min_duration": 1.0, "max_duration": 2.0},
    "val": {"count": 2, "min_duration": 1.0, "max_duration": 1.5},
}


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nemo")
    manifests = make_data(DATA, tmp / "data")
    runs = {}
    for name, seed in [("a", 11), ("b", 11), ("c", 12)]:
        run_python(
            "nemo",
            [
                "scripts/capture_nemo.py",
                "--config-path",
                "config",
                "--config-name",
                "nest_fast-conformer",
                f"model.train_ds.manifest_filepath={manifests['train']}",
                f"model.train_ds.noise_manifest={manifests['noise']}",
                f"model.validation_ds.manifest_filepath={manifests['val']}",
                *CONFIG["model_overrides"],
                "trainer.devices=1",
                "trainer.accelerator=cpu",
                f"output_dir={tmp / name}",
                f"seed={seed}",
                "save_steps=0,1",
            ],
        )
        runs[name] = tmp / name
    return runs


def compare(tmp_path, ref, cand, *extra: str):
    out = tmp_path / "cmp.pkl"
    run_python(
        "align",
        ["scripts/compare.py", "--ref", str(ref), "--cand", str(cand), "--out", str(out), *extra],
    )
    return load_result(out)  # plain data only


@pytest.mark.parametrize("step", [0, 1])
def test_same_seed_gives_identical_bytes(captures, step):
    a, b = art.step_dir(captures["a"], step), art.step_dir(captures["b"], step)
    for name in art.ALL_FILES:
        if name not in (art.METADATA, art.INDEX):  # they hold the creation time, file mtimes
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert art.load_json(a / art.INDEX)["files"] == art.load_json(b / art.INDEX)["files"]


def test_another_seed_differs(captures):
    a, c = art.step_dir(captures["a"], 0), art.step_dir(captures["c"], 0)
    assert (a / art.WEIGHTS).read_bytes() != (c / art.WEIGHTS).read_bytes()


def test_compare_agrees(captures, tmp_path):
    same = compare(tmp_path, art.step_dir(captures["a"], 1), art.step_dir(captures["b"], 1))
    assert same["verdict"] == "pass"
    a1, c1 = art.step_dir(captures["a"], 1), art.step_dir(captures["c"], 1)
    other = compare(tmp_path, a1, c1)  # seed 11 against seed 12: not a pair
    assert other["verdict"] == "error"
    assert "seed 11 vs 12" in other["errors"][0]["error"], other["errors"]
    assert compare(tmp_path, a1, c1, "--force")["verdict"] == "fail"


def test_every_artifact_reads_flat_as_torch_load_reads_it(captures):
    """NeMo's own capture (written in the nemo env) through the flat reader: no torch.load."""
    from test_flat import same

    step = art.step_dir(captures["a"], 1)
    spans = art.load_json(step / art.INDEX)["spans"]
    assert set(spans) == {n for n in art.TENSOR_FILES if (step / n).is_file()}
    source = StepSource(step)
    for name in spans:
        same(source.tensors(name), art.load_tensors(step / name), name)
