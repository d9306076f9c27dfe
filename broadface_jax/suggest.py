"""Close-match hints for messages about a misspelt name: ``' (did you mean 'lfw_dev'?)'``.

The one helper that config checks (``config_check``) and the evaluation
registry (``evaluation.registry``) append to an "unknown name" message.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable


def did_you_mean(value: Any, choices: Iterable[str]) -> str:
    """``" (did you mean 'a' or 'b'?)"`` for up to 3 close matches of ``value``, else ``""``."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
