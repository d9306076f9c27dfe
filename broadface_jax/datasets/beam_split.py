"""Examples of the large builders as a Beam pipeline, or as one generator: the same work either way.

The builders that can be large (``insightface_rec``, ``image_folder``, the
retrieval sets) list their work in the main process (the image keys of
``train.idx``, the image files) and hand it to :meth:`BeamSplitMixin._examples`
with a *reader*: a picklable callable that reads, checks and encodes one
range of that list and yields ``(key, example)`` pairs, or :class:`Skipped`
for an image that does not decode. The list is cut into ranges of
``BEAM_RANGE_SIZE`` items.

* No Beam runner asked for (``DownloadConfig.beam_runner`` and
  ``beam_options`` both unset): a generator runs the reader over the ranges in
  order, in this process (TFDS's default path).
* A runner asked for: a Beam ``PTransform`` (``Create(ranges) | Reshuffle |
  FlatMap(reader)``) that TFDS applies to its pipeline and writes as shards;
  each range is read by a worker. Skipped images go to a side output,
  collected into ``<split>.skipped.json`` in the data set's temporary folder
  and read back into the metadata after the pipeline ends.

Both paths yield the same keys and examples (TFDS orders the written
examples by a hash of the key, so the files hold them in the same order), and
the same ``skipped`` metadata (ordered by position in the list).

Errors raised by a reader inside a Beam worker (a truncated ``.rec``, a label
out of range, with ``strict`` a bad image) are wrapped with a marker
(:func:`_worker_error_text`), so that whatever the runner does to the
exception on its way back (a traceback inside a ``RuntimeError``), the
builder re-raises the original type with its one-line message
(:func:`worker_error`). TFDS writes into an ``incomplete.*`` folder and
renames it only after success; a failed pipeline leaves no prepared data set.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from absl import logging

from broadface_jax.datasets import common, recordio

#: Items (image keys, files) per Beam work unit.
BEAM_RANGE_SIZE = 1000
BEAM_EXTRA = "pip install -e '.[beam]' (broadface_jax's `beam` extra: apache-beam)"
SKIPPED_TAG = "skipped"


class BeamMissingError(ImportError):
    """A Beam runner was asked for but apache-beam is not installed."""


def import_beam():
    """``apache_beam``, or :class:`BeamMissingError` naming the extra to install."""
    try:
        import apache_beam as beam  # noqa: PLC0415
    except ImportError as e:
        raise BeamMissingError(f"a Beam runner needs apache-beam, which is not installed: "
                               f"{BEAM_EXTRA}") from e
    return beam


class Skipped(NamedTuple):
    """An image a reader left out: its name (as in ``skipped.txt``) and the one-line reason."""

    name: str
    reason: str


Event = tuple[Any, dict] | Skipped
#: A picklable callable: items -> events; an optional ``close()`` is called after the
#: single-process generator (Beam workers keep what they opened until they exit).
Reader = Callable[[Sequence], Iterator[Event]]


def ranges(items: Sequence, size: int) -> list[tuple[int, Sequence]]:
    """``(start, items[start:start + size])`` covering ``items`` in order."""
    if size < 1:
        raise ValueError(f"range size must be >= 1, got {size}")
    return [(start, items[start:start + size]) for start in range(0, len(items), size)]


# ------------------------------------------------------------------ worker errors
_ERRORS: dict[str, type[Exception]] = {
    "BadImageError": common.BadImageError,
    "RecordIOError": recordio.RecordIOError,
    "FileNotFoundError": FileNotFoundError,
    "ValueError": ValueError,
}
_BEGIN, _END = "{{broadface_jax worker error ", " end}}"
_PATTERN = re.compile(re.escape(_BEGIN) + r"(\w+): (.*?)" + re.escape(_END), re.S)


class WorkerError(RuntimeError):
    """A reader's error inside a Beam worker, its type and message kept in the text."""


def _worker_error_text(error: BaseException) -> str:
    kind = next((name for name, cls in _ERRORS.items() if type(error) is cls), None)
    if kind is None:
        kind = "BadImageError" if isinstance(error, common.BadImageError) else (
            "ValueError" if isinstance(error, ValueError) else "FileNotFoundError"
            if isinstance(error, FileNotFoundError) else type(error).__name__)
    return f"{_BEGIN}{kind}: {' '.join(str(error).split())}{_END}"


def worker_error(error: BaseException) -> Exception | None:
    """The reader error a failed pipeline carries (see module doc), re-made; None if none.

    Looks through the exception's text and its causes/contexts (runners wrap
    worker exceptions in their own types, often with the traceback as text).
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        match = _PATTERN.search(str(e))
        if match:
            cls = _ERRORS.get(match.group(1), RuntimeError)
            return cls(" ".join(match.group(2).split()))
        stack.extend([e.__cause__, e.__context__])
    return None


# ------------------------------------------------------------------ the two paths
class _RangeWorker:
    """Beam ``FlatMap`` body: one ``(start, items)`` range -> examples, skipped to a side output."""

    def __init__(self, reader: Reader, strict: bool):
        self.reader = reader
        self.strict = strict

    def __call__(self, element: tuple[int, Sequence]) -> Iterator[Any]:
        from apache_beam import pvalue  # noqa: PLC0415

        start, items = element
        try:
            for i, event in enumerate(self.reader(items)):
                if isinstance(event, Skipped):
                    if self.strict:
                        raise common.BadImageError(event.reason)
                    logging.warning("skipped bad image: %s", event.reason)
                    yield pvalue.TaggedOutput(SKIPPED_TAG, (start, i, event.name, event.reason))
                else:
                    yield event
        except (ValueError, OSError) as e:  # RecordIOError, BadImageError, missing files
            raise WorkerError(_worker_error_text(e)) from e


def _write_skipped(entries: list, path: str) -> None:
    from etils import epath  # noqa: PLC0415

    rows = [[name, reason] for _, _, name, reason in sorted(entries)]
    epath.Path(path).write_text(json.dumps(rows))


class BeamSplitMixin:
    """Mixin (before ``tfds.core.GeneratorBasedBuilder``): :meth:`_examples` as a generator
    or a Beam transform, depending on whether the download config asks for a runner."""

    BEAM_RANGE_SIZE = BEAM_RANGE_SIZE
    _beam_requested = False

    def _download_and_prepare(self, dl_manager, download_config):
        self._beam_requested = (download_config.beam_runner is not None
                                or download_config.beam_options is not None)
        self._skip_files: dict[str, tuple[Any, Callable[[list[str]], None]]] = {}
        if self._beam_requested:
            import_beam()
        try:
            return super()._download_and_prepare(dl_manager, download_config)
        except Exception as e:
            if not self._beam_requested:
                raise
            original = worker_error(e)
            if original is None:
                raise
            raise original from None

    def _process_pipeline_result(self, pipeline_result) -> None:
        super()._process_pipeline_result(pipeline_result)
        for path, on_skipped in self._skip_files.values():
            rows = json.loads(path.read_text())
            path.unlink()
            if rows:
                on_skipped([f"{name}\t{reason}" for name, reason in rows])

    def _examples(self, split: str, items: Sequence, reader: Reader, *, strict: bool = False,
                  on_skipped: Callable[[list[str]], None] | None = None):
        """A split's examples: ``reader`` over ``items`` in ranges (module doc).

        ``on_skipped(names)`` receives the ``"<name>\\t<reason>"`` list of the
        images left out (once, after the split is generated; not called when
        none was). ``strict``: the first :class:`Skipped` raises
        :class:`common.BadImageError` instead.
        """
        work = ranges(items, self.BEAM_RANGE_SIZE)
        if not self._beam_requested:
            return _generate(work, reader, strict, on_skipped)
        return self._beam_transform(split, work, reader, strict, on_skipped)

    def _beam_transform(self, split, work, reader, strict, on_skipped):
        beam = import_beam()
        path = self.data_path / f"{split}.skipped.json"  # the incomplete folder while preparing
        self._skip_files[split] = (path, on_skipped or (lambda names: None))

        @beam.ptransform_fn
        def examples(root):
            out = (root
                   | "Ranges" >> beam.Create(work)
                   | "Distribute" >> beam.Reshuffle()
                   | "ReadCheckEncode" >> beam.FlatMap(_RangeWorker(reader, strict)).with_outputs(
                       SKIPPED_TAG, main="examples"))
            _ = (out[SKIPPED_TAG]
                 | "CollectSkipped" >> beam.combiners.ToList()
                 | "WriteSkipped" >> beam.Map(_write_skipped, path=str(path)))
            return out.examples

        return examples()  # pylint: disable=no-value-for-parameter


def _generate(work: Iterable[tuple[int, Sequence]], reader: Reader, strict: bool,
              on_skipped: Callable[[list[str]], None] | None) -> Iterator[tuple[Any, dict]]:
    bad = common.SkipList(strict)
    try:
        for _, items in work:
            for event in reader(items):
                if isinstance(event, Skipped):
                    bad.skip(event.name, common.BadImageError(event.reason))
                else:
                    yield event
    finally:
        if hasattr(reader, "close"):
            reader.close()
    if bad.entries and on_skipped is not None:
        on_skipped(bad.names())
