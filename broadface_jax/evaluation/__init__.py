"""Evaluation protocols on embeddings, and the registry of evaluation targets.

Protocols (pure NumPy on features; each module's docstring states its rules):

* :mod:`.verification` - 10-fold pair verification as insightface (LFW, CFP, .bin).
* :mod:`.binfile` - insightface ``.bin`` files, read without running pickled code.
* :mod:`.protocols` - LFW ``pairs*.txt`` and CFP ``Protocol/`` readers.
* :mod:`.tar_far` - TAR @ FAR from scores.
* :mod:`.ijb` - IJB-B / IJB-C 1:1 template verification.
* :mod:`.identification` - MegaFace-style 1:N with streamed distractors.
* :mod:`.retrieval` - Recall@K (SOP / In-Shop).
* :mod:`.set_to_set` - YTF-style set verification.

Embedding (one path for every evaluator, shared across processes):
:mod:`.embedding`.

Targets: one registry of types (:mod:`.registry`: resolving names, option
checks, :class:`Evaluators` per run, ``run_targets``, the results table),
filled by the modules that define the evaluators, each type registered in
the module of its class: :mod:`.face_targets` (LFW, CFP, synthetic, ``.bin``),
:mod:`.retrieval_targets` (Recall@K), :mod:`.benchmark_targets` (IJB,
MegaFace, YTF); imported here, so the registry is full whenever the package
is imported. The image cache of the face targets: :mod:`.cache`. A target is
a ``config.evals`` entry's name, a type name or ``'<type>:<path>'``
(:func:`.registry.resolve_target`).
"""

from broadface_jax.evaluation.registry import (
    REQUIRED,
    TYPES,
    Evaluator,
    Evaluators,
    TargetError,
    TargetSpec,
    TargetType,
    build_evaluator,
    describe_types,
    format_table,
    register,
    resolve_target,
    run_targets,
    target_problems,
)

# The target modules register their types on import (this order is the `--targets list` order).
from broadface_jax.evaluation import face_targets, retrieval_targets, benchmark_targets  # noqa: E402,F401,I001

__all__ = ["REQUIRED", "TYPES", "Evaluator", "Evaluators", "TargetError", "TargetSpec", "TargetType",
           "build_evaluator", "describe_types", "format_table", "register", "resolve_target",
           "run_targets", "target_problems"]
