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

Targets, one registry of types (:mod:`.targets`, :mod:`.retrieval_targets`,
:mod:`.benchmark_targets`): ``build_evaluator(target, config).run(embed_fn,
out_dir=None)``, ``run_targets(targets, embed_fn, config, out_dir=None)`` and
``format_table(results)``; a target is a ``config.evals`` entry's name, a type
name or ``'<type>:<path>'`` (:func:`.targets.resolve_target`).
"""

from broadface_jax.evaluation.targets import (
    TYPES,
    Evaluator,
    TargetError,
    TargetSpec,
    TargetType,
    build_evaluator,
    format_table,
    register,
    resolve_target,
    run_targets,
)

__all__ = ["TYPES", "Evaluator", "TargetError", "TargetSpec", "TargetType", "build_evaluator",
           "format_table", "register", "resolve_target", "run_targets"]
