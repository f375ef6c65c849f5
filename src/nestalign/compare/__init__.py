"""Compare two captured steps (reference and candidate) category by category.

Modules: reader (a step directory), tolerances, rows, categories, layers (module calls),
divergence (culprits), step (one step), runs (several steps in one process), verdict (terminal
lines, pickle), legacy (original tool's sections), options (the scripts' shared options).

``compare_steps(ref_dir, cand_dir, tolerances, name_map=None, allow_pickle=False, force=False)``
returns a plain dict (builtins only, safe to pickle and to load with a restricted unpickler):

    format, reference, candidate, seed, step,
    verdict ("pass" | "fail" | "nonfinite" | "error"), errors, notes [{category, name, reason}],
    losses {reference, candidate}, tolerances, name_map,
    init {differs, total, first, reason} (None without initial_weights.pt), nonfinite,
    categories {structure, init, batch, forward, loss, grads, weights, layers, layer_grads}:
        matched, total, failed, noise, only_ref, only_cand, ignored, notes, worst, rows, error
    divergence {forward, backward}: classes per call and the first culprit (see .divergence)
    divergences [{where, class, direction, name, module, max_abs, max_rel}]

metadata.json of both sides is cross-checked first (step.METADATA_KEYS); a difference is an
error unless ``force``. Artifacts are loaded one pair at a time, memory-mapped: through their
index (nestalign.flat, nothing unpickled) or else ``torch.load(weights_only=True)``. A missing
or damaged artifact becomes an entry in ``errors`` (verdict "error") naming the file.
"""

from nestalign.compare.legacy import seed_sections
from nestalign.compare.options import add_tolerance_options, parse_steps, tolerance_settings
from nestalign.compare.runs import compare_runs
from nestalign.compare.step import CATEGORIES, FORMAT, compare_steps
from nestalign.compare.tolerances import ToleranceError, load_tolerances
from nestalign.compare.verdict import save_result, verdict_lines, write_atomic

__all__ = [
    "CATEGORIES",
    "FORMAT",
    "ToleranceError",
    "add_tolerance_options",
    "compare_runs",
    "compare_steps",
    "load_tolerances",
    "parse_steps",
    "save_result",
    "seed_sections",
    "tolerance_settings",
    "verdict_lines",
    "write_atomic",
]
