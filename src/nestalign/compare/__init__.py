"""Compare two captured steps (reference and candidate) category by category.

Modules: reader (a step directory), tolerances, rows, categories, layers (module calls),
divergence (culprits), step (one step), verdict (terminal lines, pickle), legacy (original
tool's sections).

``compare_steps(ref_dir, cand_dir, tolerances, name_map=None)`` returns a plain dict (builtins
only, safe to pickle and to load with a restricted unpickler):

    format, reference, candidate, seed, step, verdict ("pass" | "fail" | "error"), errors,
    losses {reference, candidate}, tolerances, name_map,
    categories {structure, batch, forward, loss, grads, weights, layers, layer_grads}:
        matched, total, failed, noise, only_ref, only_cand, ignored, worst, rows, error
    divergence {forward, backward}: classes per call and the first culprit (nestalign.compare.divergence)

Artifacts are loaded one pair at a time, memory-mapped, with ``weights_only=True``. A missing or
damaged artifact becomes an entry in ``errors`` (verdict "error") naming the file.
"""

from nestalign.compare.legacy import seed_sections
from nestalign.compare.step import CATEGORIES, FORMAT, compare_steps
from nestalign.compare.tolerances import ToleranceError, load_tolerances
from nestalign.compare.verdict import save_result, verdict_lines, write_atomic

__all__ = [
    "CATEGORIES",
    "FORMAT",
    "ToleranceError",
    "compare_steps",
    "load_tolerances",
    "save_result",
    "seed_sections",
    "verdict_lines",
    "write_atomic",
]
