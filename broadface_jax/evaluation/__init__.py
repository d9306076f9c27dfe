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

Targets: ``build_evaluator(name, config).run(embed_fn, out_dir=None)``,
``run_targets(names, embed_fn, config, out_dir=None)`` and
``format_table(results)`` (see :mod:`.targets`).
"""

from broadface_jax.evaluation.targets import (
    Evaluator,
    build_evaluator,
    format_table,
    run_targets,
)

__all__ = ["Evaluator", "build_evaluator", "format_table", "run_targets"]
