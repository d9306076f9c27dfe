"""Prepares a face data set for training/evaluation: raw files -> TFDS (ArrayRecord).

    python -m broadface_jax.prepare --dataset insightface_rec \\
        --manual_dir /data/faces_emore --data_dir /data/tfds
    python -m broadface_jax.prepare --dataset lfw --manual_dir ../shared/data/lfw --data_dir data/tfds
    python -m broadface_jax.prepare --dataset cfp --manual_dir ../shared/data/cfp --data_dir data/tfds
    python -m broadface_jax.prepare --dataset image_folder --manual_dir /data/my_faces --data_dir data/tfds
    python -m broadface_jax.prepare --dataset sop --manual_dir /data/Stanford_Online_Products --data_dir data/tfds

Runs the builder's `download_and_prepare` (TFDS shows progress bars), writing
ArrayRecord files, which the training pipeline reads by random access (exact
resume at any step). Then train with `config.dataset.tfds_name = <dataset>`
and `config.dataset.data_dir = <data_dir>`; set `config.num_classes` to the
printed number of identities.

manual_dir per data set:
  insightface_rec  folder with train.rec, train.idx (and property)
  image_folder     one sub-folder of aligned face images per identity
  lfw              LFW folder with images_deepfunneled/ and peopleDevTrain.txt
                   (CFP's list_name.txt: --cfp_names_file, default
                   <manual_dir>/../cfp/cfp-dataset/Data/list_name.txt)
  cfp              CFP's cfp-dataset folder (or its parent)
  sop              Stanford_Online_Products/ (Ebay_train.txt, Ebay_test.txt, class folders)
  inshop           In-Shop folder with list_eval_partition.txt and img/
  cub200           CUB_200_2011/ (images.txt, image_class_labels.txt, images/)
  cars196          folder with cars_annos.mat and car_ims/
The retrieval sets keep their images at their own size (see
broadface_jax/datasets/retrieval.py for the splits and labels).

Bad images (image_folder, insightface_rec): every image is decoded in full;
one that does not decode (not an image, truncated, damaged JPEG data) is
skipped, logged, listed in `<data_dir>/<dataset>/<version>/skipped.txt`
(`reason<TAB>file<TAB>detail`, with the other files left out) and counted
in the summary printed at the end. `--strict` stops at the first bad image
instead, with one line naming it (exit 1).

Apache Beam (insightface_rec, image_folder and the retrieval sets; needs
`pip install -e '.[beam]'`): the image keys / files are read, checked and
encoded in ranges by Beam workers, the same examples as without Beam.

    # this machine, 8 worker processes
    python -m broadface_jax.prepare --dataset insightface_rec --manual_dir /data/webface42m \
        --data_dir /data/tfds --beam_runner=DirectRunner --beam_workers=8
    # any runner: Beam's own options, comma-separated (docs/DATA.md: Dataflow, Flink, Spark)
    python -m broadface_jax.prepare ... --beam_pipeline_options="runner=FlinkRunner,flink_master=host:8081,parallelism=64"

A worker's error (truncated .rec, label out of range, with --strict a bad
image) is reported as the same one line; a failed run leaves no prepared
data set (TFDS writes into an `incomplete.*` folder and renames it at the end).
See docs/DATA.md for the measured rates.
"""

from __future__ import annotations

import inspect
import pathlib
import sys

from absl import app, flags

from broadface_jax import cli, datasets

_DATASET = flags.DEFINE_enum("dataset", None, list(datasets.SHORT_NAMES), "Data set to prepare.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with the raw data (see the module doc).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir to write to (default: TFDS's default).")
_CFP_NAMES = flags.DEFINE_string("cfp_names_file", None,
                                 "lfw only: CFP's list_name.txt (people to leave out of dev_train).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild even if the data set is already prepared.")
_STRICT = flags.DEFINE_bool("strict", False, "image_folder / insightface_rec: stop at the first "
                            "image that does not decode instead of skipping and listing it.")
_BEAM_RUNNER = flags.DEFINE_string(
    "beam_runner", None, "Prepare with Apache Beam on this runner (e.g. DirectRunner: this machine; "
    "needs the `beam` extra). Default: no Beam, one process.")
_BEAM_WORKERS = flags.DEFINE_integer(
    "beam_workers", None, "DirectRunner only: worker processes (direct_num_workers; 1 = in this "
    "process, > 1 = multi_processing).")
_BEAM_OPTIONS = flags.DEFINE_string(
    "beam_pipeline_options", None, "Beam pipeline options as comma-separated key=value pairs, e.g. "
    "'runner=DataflowRunner,project=P,region=R,temp_location=gs://B/tmp' (passed to TFDS's "
    "DownloadConfig.beam_options).")
_FILE_FORMAT = flags.DEFINE_enum("file_format", "array_record", ["array_record", "tfrecord"],
                                 "Output format; training needs array_record (random access).")


SKIPPED_FILE = "skipped.txt"


def beam_options(runner: str | None = None, workers: int | None = None,
                 pipeline_options: str | None = None):
    """``(runner, PipelineOptions)`` for TFDS's DownloadConfig from the three flags; None without Beam.

    ``pipeline_options`` is ``key=value[,key=value...]`` (each becomes
    ``--key=value``, as ``tfds build --beam_pipeline_options``); its
    ``runner=`` and ``runner`` must agree when both are given. ``workers``
    needs the DirectRunner: 1 runs in this process (``in_memory``), more run
    that many processes (``multi_processing``), whose own logs are kept to
    CRITICAL unless ``default_sdk_harness_log_level`` is given. Bad values raise ValueError
    naming the flag; a missing apache-beam raises
    ``beam_split.BeamMissingError`` naming the extra.
    """
    from broadface_jax.datasets import beam_split

    if runner is None and workers is None and not pipeline_options:
        return None
    pairs = []
    for item in (pipeline_options or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ValueError(f"--beam_pipeline_options: expected key=value pairs separated by commas, "
                             f"got {item!r}")
        pairs.append((key, value.strip()))
    runners = [v for k, v in pairs if k == "runner"]
    if runner is not None and runners and runners[-1] != runner:
        raise ValueError(f"--beam_runner={runner} but --beam_pipeline_options has runner={runners[-1]}")
    runner = runner or (runners[-1] if runners else None)
    if runner is None:
        raise ValueError("--beam_pipeline_options without runner=...: name the runner there or "
                         "with --beam_runner (e.g. DirectRunner)")
    if workers is not None:
        if runner not in ("DirectRunner", "direct"):
            raise ValueError(f"--beam_workers applies to --beam_runner=DirectRunner, not {runner} "
                             "(other runners take their own options, e.g. max_num_workers, parallelism)")
        if workers < 1:
            raise ValueError(f"--beam_workers must be >= 1, got {workers}")
        pairs += [("direct_num_workers", str(workers)),
                  ("direct_running_mode", "in_memory" if workers == 1 else "multi_processing")]
        if not any(k == "default_sdk_harness_log_level" for k, _ in pairs):
            # The worker processes would log every bundle at INFO and a failed one's traceback
            # (~200 lines); its error comes back as prepare's one line anyway.
            pairs.append(("default_sdk_harness_log_level", "CRITICAL"))
    beam = beam_split.import_beam()
    flags_list = [f"--{k}={v}" for k, v in pairs if k != "runner"] + [f"--runner={runner}"]
    return runner, beam.options.pipeline_options.PipelineOptions(flags=flags_list)


def prepare(dataset: str, manual_dir: str, data_dir: str | None = None, *,
            cfp_names_file: str | None = None, overwrite: bool = False,
            file_format: str = "array_record", strict: bool = False,
            beam_runner: str | None = None, beam_workers: int | None = None,
            beam_pipeline_options: str | None = None):
    """Builds `dataset` from `manual_dir` into `data_dir`; returns the builder.

    Writes ``skipped.txt`` beside the prepared files when anything was left
    out (:func:`write_skipped`). ``strict``: the first bad image raises
    ``datasets.common.BadImageError`` (builders that check images only).
    ``beam_*``: prepare as an Apache Beam pipeline (:func:`beam_options`;
    builders based on ``datasets.beam_split.BeamSplitMixin`` only).
    """
    import tensorflow_datasets as tfds

    from broadface_jax import input_pipeline

    from etils import epath

    input_pipeline.hide_gpus_from_tensorflow()
    manual = epath.Path(manual_dir)  # a local folder, or gs://... for insightface_rec on Dataflow
    if not manual.is_dir():
        raise FileNotFoundError(f"--manual_dir {manual} is not a directory")
    if not any(manual.iterdir()):
        raise FileNotFoundError(f"--manual_dir {manual} is empty")
    kwargs = {"file_format": file_format}
    if cfp_names_file is not None:
        if datasets.builder_class(dataset).name != "lfw_aligned":
            raise ValueError("--cfp_names_file only applies to --dataset lfw")
        kwargs["cfp_names_file"] = cfp_names_file
    if strict:
        if "strict" not in inspect.signature(datasets.builder_class(dataset).__init__).parameters:
            raise ValueError(f"--strict applies to --dataset image_folder and insightface_rec, "
                             f"not {dataset}")
        kwargs["strict"] = True
    from broadface_jax.datasets import beam_split

    wants_beam = beam_runner is not None or beam_workers is not None or bool(beam_pipeline_options)
    if wants_beam and not issubclass(datasets.builder_class(dataset), beam_split.BeamSplitMixin):
        usable = [n for n in datasets.SHORT_NAMES
                  if issubclass(datasets.builder_class(n), beam_split.BeamSplitMixin)]
        raise ValueError(f"--beam_runner / --beam_pipeline_options apply to --dataset "
                         f"{', '.join(usable)}, not {dataset}")
    beam = beam_options(beam_runner, beam_workers, beam_pipeline_options)
    builder = datasets.get_builder(dataset, data_dir, **kwargs)
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    runner, options = beam if beam is not None else (None, None)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(manual), download_mode=mode, beam_runner=runner, beam_options=options))
    write_skipped(builder)
    return builder


def write_skipped(builder):
    """``skipped.txt`` in the prepared data set's folder: one ``reason<TAB>file[<TAB>detail]``
    line per file left out (from the metadata's ``skipped``); None when nothing was.
    Returns its ``etils.epath.Path`` (data_dir may be ``gs://``...)."""
    from etils import epath

    skipped = (builder.info.metadata or {}).get("skipped") or {}
    lines = [f"{reason}\t{entry}" for reason, entries in skipped.items() for entry in entries]
    if not lines:
        return None
    path = epath.Path(builder.data_dir) / SKIPPED_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def summary(builder) -> str:
    """One line per split plus the number of identities."""
    lines = [f"{builder.name} {builder.version} in {builder.data_dir}"]
    for name, split in builder.info.splits.items():
        lines.append(f"  split {name}: {split.num_examples} examples")
    meta = builder.info.metadata or {}
    if "num_classes" in meta:
        lines.append(f"  identities (num_classes): {meta['num_classes']}")
    skipped = meta.get("skipped") or {}
    for reason, names in skipped.items():
        names = [n.split("\t")[0] for n in names]  # bad_images: "file<TAB>reason"
        shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        lines.append(f"  skipped ({reason.replace('_', ' ')}): {len(names)}: {shown}")
    if any(skipped.values()):
        lines.append(f"  skipped files listed in {pathlib.Path(builder.data_dir) / SKIPPED_FILE}")
    if "classes_per_split" in meta:  # retrieval sets: classes of every split
        lines.append("  classes per split: " + ", ".join(f"{k} {v}" for k, v in meta["classes_per_split"].items()))
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from broadface_jax.datasets import beam_split, common

    cli.quiet_third_party_logs()
    try:
        builder = prepare(_DATASET.value, _MANUAL_DIR.value, _DATA_DIR.value,
                          cfp_names_file=_CFP_NAMES.value, overwrite=_OVERWRITE.value,
                          file_format=_FILE_FORMAT.value, strict=_STRICT.value,
                          beam_runner=_BEAM_RUNNER.value, beam_workers=_BEAM_WORKERS.value,
                          beam_pipeline_options=_BEAM_OPTIONS.value)
    except beam_split.BeamMissingError as e:
        cli.fail(str(e), cli.EXIT_USAGE)
    except common.BadImageError as e:  # --strict
        cli.fail(f"{' '.join(str(e).split())} (--strict: stopped at the first bad image; "
                 "without it bad images are skipped and listed)", 1)
    except FileNotFoundError as e:
        cli.fail(" ".join(str(e).split()), cli.EXIT_USAGE)
    except ValueError as e:
        cli.fail(" ".join(str(e).split()), 1)
    print(summary(builder), file=sys.stdout)


def cli_main() -> None:
    """The ``broadface-prepare`` console script: ``python -m broadface_jax.prepare``."""
    flags.mark_flags_as_required(["dataset", "manual_dir"])
    cli.run(main)


if __name__ == "__main__":
    cli_main()
