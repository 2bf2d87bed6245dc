"""The plugin's work, as plain functions over FiftyOne collections.

The operators in ``__init__.py`` only translate an execution context into calls
of these functions. Everything model-related goes through refseg: images are
read with :func:`refseg.load_image`, banks are built with
:class:`refseg.method.references.BankBuilder` (the same code as ``refseg build-bank``),
targets are labelled with :class:`refseg.Segmenter`; this module moves labels between
FiftyOne and refseg. What it needs of FiftyOne beyond its public API is in
:mod:`refseg_fiftyone.fiftyone_access`.

Where things are kept:

- a memory bank is a safetensors file under :func:`bank_dir`, in a folder of its
  dataset's own (:func:`bank_path`: named by the dataset's id); the dataset's
  ``info["refseg_banks"][<bank name>]`` points to it, records which dataset owns it
  and its digest, and the models and settings it was built with, so labelling runs
  reuse them; a clone writes its own copy before changing a bank;
- a labelled sample's ``Detections`` carry the run key (``refseg_run``) and the bank
  name (``refseg_bank``) on the container, written in the same update as the labels:
  a run that stops half way leaves every finished sample complete and marked, and
  running it again labels only the rest;
- the last run per output field is summarised in ``info["refseg_runs"][<field>]``;
- each evaluation (per-class AP, AP50) in ``info["refseg_evals"][<eval key>]``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Generator, Iterable

import numpy as np

import fiftyone as fo
import fiftyone.core.utils as fou
from fiftyone import ViewField as F

import refseg
from refseg import ImageLoadError, MemoryBank, Reference, ReferenceEncoder
from refseg.io.files import sha256_file, write_json_atomic
from refseg.runtime.candidate_cache import CandidateCache
from refseg.models.devices import select_device
from refseg.method.identity import identity_key
from refseg.io.images import image_size
from refseg.models.registry import DEFAULT_ENCODER, DEFAULT_PROPOSER  # noqa: F401 (the operators use them)
from refseg.runtime.run_spec import RunSpec, format_overrides, parse_overrides  # noqa: F401 (plugin API)
from refseg.method.references import BankBuilder, BankReport, box_problem, masks_from_boxes
from refseg.runtime.labelling import LabelStats, batched, label_stream
from refseg.method.calibration import calibrate_bank
from refseg.method.prompt_selection import stored_prompt_threshold
from refseg.method.thresholds import HeldOutImage, stored_thresholds

from . import fiftyone_access
from .convert import (box_to_pixels, detection_box_pixels, detection_mask, mask_to_crop, pixel_xywh,
                      to_fiftyone_detections)

PLUGIN_NAME = "@refseg/refseg"
BANKS_KEY = "refseg_banks"  # dataset.info key: bank name -> record
RUNS_KEY = "refseg_runs"  # dataset.info key: output field -> last run summary
EVALS_KEY = "refseg_evals"  # dataset.info key: eval key -> evaluate_auto_labels report
RUN_ATTR = "refseg_run"  # on a labelled sample's Detections: the run key
BANK_ATTR = "refseg_bank"  # on a labelled sample's Detections: the bank name
BANK_DIR_ENV = "REFSEG_BANK_DIR"
CANDIDATE_DIR_ENV = "REFSEG_CANDIDATE_DIR"

# Defaults of the operators' parameters, written once: the operators' forms, their Python
# __call__ signatures and the functions of this module all use these. The models default to the paper's
# (refseg.models.registry). The FiftyOne labels of the presets "default" and "paper" are the same (paper mode
# differs only in COCO results files' boxes); banks are recorded with "paper", as they always were.
DEFAULT_PRESET = "paper"
DEFAULT_DEVICE = "auto"
DEFAULT_BANK = "default"
DEFAULT_REFERENCE_TAG = "reference"
DEFAULT_LABEL_FIELD = "ground_truth"  # the annotated field offered first in the forms
DEFAULT_OUTPUT_FIELD = "refseg"
DEFAULT_BANK_BATCH_SIZE = 8  # references embedded at a time
DEFAULT_LABEL_BATCH_SIZE = 1  # target images labelled at a time (per device)
DEFAULT_EXISTING = "resume"
DEFAULT_REJECTED_TAG = "rejected"
DEFAULT_ACCEPTED_TAG = "accepted"
DEFAULT_EVAL_KEY = "refseg_eval"
DEFAULT_IOU = 0.5
DEFAULT_MASK_FORMAT = "rle"
MASK_FORMATS = ("rle", "polygons")
MAX_REPORTED = 200  # skipped/failed entries listed in a report (counts stay exact)

EXISTING_MODES = ("resume", "skip_labelled", "overwrite")


class Progress(tuple):
    """(done, total, label) of a long job, as yielded by the ``iter_*`` functions."""

    def __new__(cls, done: int, total: int, label: str = ""):
        return super().__new__(cls, (done, total, label))

    @property
    def fraction(self) -> float:
        return self[0] / self[1] if self[1] else 1.0


# ---------------------------------------------------------------------------- settings


def plugin_settings(dataset: fo.Dataset | None = None) -> dict:
    """The plugin's settings: the App config's ``plugins["@refseg/refseg"]``, then the dataset's on top."""
    merged = dict((fo.app_config.plugins or {}).get(PLUGIN_NAME, {}) or {})
    if dataset is not None:
        merged.update((dataset.app_config.plugins or {}).get(PLUGIN_NAME, {}) or {})
    return merged


def _folder(env: str, setting: str, default: str, dataset: fo.Dataset | None) -> Path:
    """``$env``, else the plugin setting ``setting``, else ``~/.cache/refseg/<default>``."""
    chosen = os.environ.get(env) or plugin_settings(dataset).get(setting)
    return Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "refseg" / default


def bank_dir(dataset: fo.Dataset | None = None) -> Path:
    """Folder of memory banks: ``$REFSEG_BANK_DIR``, else the ``bank_dir`` setting, else ``~/.cache/refseg/banks``."""
    return _folder(BANK_DIR_ENV, "bank_dir", "banks", dataset)


def candidate_dir(dataset: fo.Dataset | None = None) -> Path:
    """Folder of cached proposals: ``$REFSEG_CANDIDATE_DIR``, else the ``candidate_dir`` setting,
    else ``~/.cache/refseg/candidates``."""
    return _folder(CANDIDATE_DIR_ENV, "candidate_dir", "candidates", dataset)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "unnamed"


def _bank_file_name(bank_name: str) -> str:
    """``<bank name>.safetensors``; a name the slug changes gets a digest of it too ("x#y" and "x y" differ)."""
    slug = _slug(bank_name)
    if slug != bank_name:
        slug += "-" + hashlib.sha256(bank_name.encode()).hexdigest()[:8]
    return f"{slug}.safetensors"


def bank_path(dataset: fo.Dataset, bank_name: str) -> Path:
    """The dataset's own file of a bank: ``<bank_dir>/<dataset name slug>-<dataset id>/<bank name>.safetensors``.

    The dataset's id (unique, kept through a rename, new for a clone) keeps the files of
    datasets whose names give the same slug apart; the slug is for humans browsing the folder.
    """
    folder = f"{_slug(dataset.name)}-{fiftyone_access.dataset_id(dataset)}"
    return bank_dir(dataset) / folder / _bank_file_name(bank_name)


def _legacy_bank_path(dataset: fo.Dataset, bank_name: str) -> Path:
    """Where banks were filed before files were keyed by the dataset id: ``<bank_dir>/<dataset slug>/<bank slug>``."""
    return bank_dir(dataset) / _slug(dataset.name) / f"{_slug(bank_name)}.safetensors"


def default_run_spec(dataset: fo.Dataset | None = None, **changes: Any) -> RunSpec:
    """The run specification of a new bank: the plugin settings (``proposer``, ``encoder``, ``preset``)
    over refseg's defaults (the paper's models, preset :data:`DEFAULT_PRESET`), then ``changes``."""
    settings = plugin_settings(dataset)
    base = RunSpec(preset=DEFAULT_PRESET).with_changes(**{k: settings.get(k) for k in ("proposer", "encoder", "preset")})
    return base.with_changes(**changes)


def resolve_device(name: str | None, dataset: fo.Dataset | None = None):
    """``name`` (``auto``, ``cpu``, ``cuda:0``...), else the ``device`` setting, else automatic."""
    return select_device(name or plugin_settings(dataset).get("device") or None)


# ---------------------------------------------------------------------------- components

_COMPONENTS: "OrderedDict[tuple, Any]" = OrderedDict()
_MAX_CACHED = 4  # an App server keeps the last few models loaded between runs


def _cached(key: tuple, build: Callable[[], Any]) -> Any:
    if key in _COMPONENTS:
        _COMPONENTS.move_to_end(key)
        return _COMPONENTS[key]
    obj = build()
    _COMPONENTS[key] = obj
    while len(_COMPONENTS) > _MAX_CACHED:
        _COMPONENTS.popitem(last=False)
    return obj


def load_encoder(spec: RunSpec, device) -> refseg.FeatureEncoder:
    """The feature encoder of ``spec`` (cached per process)."""
    key = ("encoder", spec.encoder, spec.encoder_checkpoint, spec.encoder_input_size, spec.random_init, spec.seed,
           str(device))
    return _cached(key, lambda: spec.build_encoder(device))


def load_proposer(spec: RunSpec, device) -> refseg.ProposalGenerator:
    """The proposal generator of ``spec`` (cached per process)."""
    key = ("proposer", spec.proposer, spec.proposer_checkpoint, spec.config().proposal, spec.random_init, spec.seed,
           str(device))
    return _cached(key, lambda: spec.build_proposer(device))


def clear_component_cache() -> None:
    """Forget the loaded models (frees their memory)."""
    _COMPONENTS.clear()


# ---------------------------------------------------------------------------- fields and records


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


_dataset_of = fiftyone_access.root_dataset


def check_detections_field(samples, field_name: str, purpose: str = "labels") -> None:
    """Raise a ValueError unless ``field_name`` is a ``Detections`` field of the collection."""
    if not field_name:
        raise ValueError(f"no {purpose} field given")
    schema = samples.get_field_schema()
    if field_name not in schema:
        detections = sorted(
            name for name, f in schema.items()
            if isinstance(f, fo.EmbeddedDocumentField) and issubclass(f.document_type, fo.Detections))
        raise ValueError(f"the {purpose} field {field_name!r} does not exist on dataset {_dataset_of(samples).name!r}"
                         f" (Detections fields: {', '.join(detections) or 'none'})")
    f = schema[field_name]
    if not (isinstance(f, fo.EmbeddedDocumentField) and issubclass(f.document_type, fo.Detections)):
        raise ValueError(f"the {purpose} field {field_name!r} holds {getattr(f, 'document_type', type(f)).__name__}"
                         f", not Detections")


def _ensure_output_field(dataset: fo.Dataset, field_name: str) -> None:
    if dataset.has_sample_field(field_name):
        check_detections_field(dataset, field_name, "output")
    else:
        dataset.add_sample_field(field_name, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)


def list_banks(dataset: fo.Dataset) -> dict[str, dict]:
    """Records of the dataset's memory banks, by name."""
    return dict((dataset.info or {}).get(BANKS_KEY, {}) or {})


def bank_record(dataset: fo.Dataset, bank_name: str) -> dict:
    """The record of one bank (path, models, classes, counts...)."""
    banks = list_banks(dataset)
    if bank_name not in banks:
        known = ", ".join(sorted(banks)) or "none: build one with build_memory_bank"
        raise ValueError(f"dataset {dataset.name!r} has no memory bank named {bank_name!r} (banks: {known})")
    return banks[bank_name]


def _bank_file(dataset: fo.Dataset, record: dict, bank_name: str) -> Path:
    """The file a bank record names: its recorded path as is, else (the bank folder moved: another machine,
    another ``REFSEG_BANK_DIR``) the same folder and file under the current :func:`bank_dir`."""
    if not record.get("path"):
        return bank_path(dataset, bank_name)
    path = Path(record["path"])
    if not path.exists():
        moved = bank_dir(dataset) / path.parent.name / path.name
        if moved.exists():
            return moved
    return path


def _owned(dataset: fo.Dataset, record: dict) -> bool:
    """Whether the record's file was written for this dataset (not inherited by a clone or a copy)."""
    return record.get("owner_id") == fiftyone_access.dataset_id(dataset)


def _file_key(path: Path) -> tuple[str, str]:
    """A bank file's folder and name: the same under any bank directory (compared to find a file's users)."""
    return path.parent.name, path.name


def _other_users(dataset: fo.Dataset, bank_name: str, path: Path) -> list[str]:
    """The bank records of every dataset, this one's other banks included, that name the file ``path``."""
    own_id, key = fiftyone_access.dataset_id(dataset), _file_key(path)
    users = []
    for ds_id, ds_name, banks in fiftyone_access.info_entries(BANKS_KEY):
        records = banks.items() if isinstance(banks, dict) else ()
        users += [f"{ds_name}/{name}" for name, record in records
                  if (ds_id, name) != (own_id, bank_name) and isinstance(record, dict) and record.get("path")
                  and _file_key(Path(record["path"])) == key]
    return users


def load_bank(dataset: fo.Dataset, bank_name: str) -> tuple[MemoryBank, dict]:
    """The bank and its record; refused when the file is not the one recorded (its sha256 differs)."""
    record = bank_record(dataset, bank_name)
    path = _bank_file(dataset, record, bank_name)
    if not path.exists():
        raise FileNotFoundError(f"the file of memory bank {bank_name!r} of dataset {dataset.name!r} is missing: "
                                f"{path}; build the bank again with build_memory_bank")
    recorded = record.get("digest")
    if recorded and sha256_file(path) != recorded:
        if record.get("owner_id") and not _owned(dataset, record):
            raise ValueError(f"memory bank {bank_name!r} of dataset {dataset.name!r} is the file of dataset "
                             f"{record.get('owner', record['owner_id'])!r} ({path}; this dataset is a clone or copy "
                             "of it), which has rebuilt or updated it since: it is no longer this dataset's bank. "
                             "Build the bank again on this dataset with build_memory_bank: it then gets a file of "
                             "its own")
        raise ValueError(f"the file of memory bank {bank_name!r} ({path}) is not the one recorded for dataset "
                         f"{dataset.name!r}: it was changed or replaced since the bank was built or updated (sha256 "
                         f"{recorded[:12]}... recorded). Labelling with it could mix another bank's classes into "
                         "this dataset: build the bank again with build_memory_bank")
    return MemoryBank.load(path), record


def _set_bank_record(dataset: fo.Dataset, bank_name: str, record: dict | None) -> None:
    """Store (``None``: remove) a bank's record in ``dataset.info``."""
    dataset.reload()
    info = dict(dataset.info or {})
    banks = dict(info.get(BANKS_KEY, {}) or {})
    if record is None:
        banks.pop(bank_name, None)
    else:
        banks[bank_name] = record
    info[BANKS_KEY] = banks
    dataset.info = info
    dataset.save()


def _save_bank(dataset: fo.Dataset, bank_name: str, bank: MemoryBank, settings: RunSpec,
               extra: dict | None = None, updating: bool = False) -> dict:
    """Write the bank file and its record in ``dataset.info`` (``updating``: keep the creation time).

    The file is rewritten in place only if this dataset owns it; a bank whose record came with
    a clone or a copy of another dataset (or was filed before files had owners) is written to
    this dataset's own :func:`bank_path` instead, leaving the other dataset's file as it was.
    """
    old = list_banks(dataset).get(bank_name, {})
    path = _bank_file(dataset, old, bank_name) if old and _owned(dataset, old) else bank_path(dataset, bank_name)
    path = bank.save(path)
    positives, negatives = bank.counts(), bank.counts(negative=True)
    record = {
        "path": str(path),
        "digest": sha256_file(path),
        "owner_id": fiftyone_access.dataset_id(dataset),  # the dataset this file belongs to
        "owner": dataset.name,
        "models": settings.to_dict(),
        "proposer": settings.proposer,
        "encoder": settings.encoder,
        "preset": settings.preset,
        "classes": list(bank.class_names),
        "counts": [{"class": c, "references": positives[c], "negatives": negatives[c]} for c in bank.class_names],
        "created_at": old.get("created_at", _now()) if updating else _now(),
        "updated_at": _now(),
    }
    record.update(extra or {})
    _set_bank_record(dataset, bank_name, record)
    return record


def delete_bank(dataset: fo.Dataset, bank_name: str, delete_file: bool = True) -> Path | None:
    """Remove a bank's record, and (``delete_file``) its file: only a file this dataset owns and no other
    bank record of any dataset names (a clone's, a copy's). Returns the file deleted, if one was."""
    record = bank_record(dataset, bank_name)
    deleted = None
    if delete_file and record.get("path"):
        path = _bank_file(dataset, record, bank_name)
        legacy = not record.get("owner_id") and _file_key(path) == _file_key(_legacy_bank_path(dataset, bank_name))
        if (_owned(dataset, record) or legacy) and not _other_users(dataset, bank_name, path):
            path.unlink(missing_ok=True)
            deleted = path
    _set_bank_record(dataset, bank_name, None)
    return deleted


def _capped(entries: list) -> list:
    return entries[:MAX_REPORTED]


# ---------------------------------------------------------------------------- references


def _references_of(sample, image, label_field: str, classes: set | None, builder: BankBuilder) -> list[Reference]:
    """The sample's instances in ``label_field`` as refseg references (mask, else box); the unusable ones go to
    ``builder``'s report with the reason."""
    h, w = image.shape[:2]
    labels = sample[label_field]
    refs = []
    for det in (labels.detections if labels is not None else []):
        if classes is not None and det.label not in classes:
            continue
        source = {"sample_id": sample.id, "label_id": det.id, "field": label_field}
        if det.label is None:
            builder.skip(source, None, "detection has no label")
            continue
        if det.bounding_box is None or len(det.bounding_box) != 4:
            builder.skip(source, det.label, "detection has no bounding box")
            continue
        try:
            mask = detection_mask(det, h, w)
        except Exception as exc:  # unreadable mask_path, odd arrays
            builder.skip(source, det.label, f"cannot read mask: {exc}")
            continue
        box = detection_box_pixels(det, h, w)
        if mask is None and (box[2] - box[0] < 1 or box[3] - box[1] < 1):
            builder.skip(source, det.label, "box narrower than a pixel and no mask")
            continue
        refs.append(Reference(image=image, class_name=det.label, mask=mask, box=box, source=source))
    return refs


def _bank_builder(models: RunSpec, device, encoder, bank: MemoryBank, classes: Iterable[str] = (),
                  batch_size: int = DEFAULT_BANK_BATCH_SIZE) -> BankBuilder:
    """refseg's bank builder with the models' settings; the proposer is loaded only for a usable box-only reference."""
    config = models.config()
    ref_encoder = ReferenceEncoder(encoder, config.reference, proposal_image_size=config.proposal.image_size,
                                   precision=config.precision, proposer_factory=lambda: load_proposer(models, device))
    return BankBuilder(ref_encoder, bank, classes=classes, batch_size=batch_size)


def _skipped_records(report: BankReport) -> list[dict]:
    """The report's skipped references as dicts: the FiftyOne source (sample, label, field), class and reason."""
    return [{**source, "class": c, "reason": reason} for source, c, reason in report.skipped]


def build_memory_bank(samples, *, label_field: str, bank_name: str = DEFAULT_BANK,
                      reference_tag: str = DEFAULT_REFERENCE_TAG, classes: Iterable[str] | None = None,
                      models: RunSpec | None = None, device: str | None = None,
                      batch_size: int = DEFAULT_BANK_BATCH_SIZE) -> dict:
    """Build (or rebuild) a memory bank from the samples tagged ``reference_tag``.

    Each instance of ``label_field`` (``Detections`` with masks, or boxes only:
    those get a mask from the proposer's box prompt) of a selected class becomes
    a reference. Saves the bank file and its record in ``dataset.info``; returns
    a report: references used per class, and each skipped one with the reason.
    Without ``classes``, the classes declared for the field (``dataset.classes``,
    ``default_classes``: e.g. every category of an imported COCO file) that no
    reference sample annotates are listed in ``missing_classes`` too.
    """
    dataset = _dataset_of(samples)
    if not bank_name:
        raise ValueError("no bank name given")
    check_detections_field(samples, label_field, "reference")
    refs_view = samples.match_tags(reference_tag)
    n_samples = len(refs_view)
    if n_samples == 0:
        raise ValueError(f"no sample of the {len(samples)} here is tagged {reference_tag!r}: tag a few annotated "
                         f"samples {reference_tag!r} (or name their tag) before building a bank")
    present = [c for c in refs_view.distinct(f"{label_field}.detections.label") if c is not None]
    if not present:
        raise ValueError(f"the {n_samples} sample(s) tagged {reference_tag!r} have no instance in {label_field!r}: "
                         "annotate them first")
    wanted = list(dict.fromkeys(classes)) if classes else list(present)
    if not set(wanted) & set(present):
        raise ValueError(f"none of the classes {wanted} has an instance in {label_field!r} on the reference samples "
                         f"(present: {', '.join(present)})")

    if not classes:  # declared classes (e.g. every category of an imported COCO file), annotated or not
        wanted += [c for c in (samples.get_classes(label_field) or []) if c not in wanted]

    models = models or default_run_spec(dataset)
    device = resolve_device(device, dataset)
    encoder = load_encoder(models, device)
    builder = _bank_builder(models, device, encoder, MemoryBank(encoder.settings(), class_names=wanted),  # stable
                            classes=wanted, batch_size=batch_size)  # order of the classes
    wanted_set = set(wanted)
    for sample in refs_view.select_fields(label_field).iter_samples():
        try:
            image = refseg.load_image(sample.filepath)
        except ImageLoadError as exc:
            labels = sample[label_field]
            for det in (labels.detections if labels is not None else []):
                if det.label in wanted_set:
                    builder.skip({"sample_id": sample.id, "label_id": det.id, "field": label_field}, det.label,
                                 str(exc))
            continue
        builder.add_all(_references_of(sample, image, label_field, wanted_set, builder))
    bank, report = builder.finish()

    class_rows = report.rows()
    for c, n in bank.counts().items():
        if n == 0:
            bank.remove_class(c)  # no usable reference: the class is reported, not kept
    if not len(bank):
        detail = "; ".join(f"{r['class']}: {', '.join(r['reasons'])}" for r in class_rows)
        raise ValueError(f"no usable reference: nothing was saved ({detail})")
    record = _save_bank(dataset, bank_name, bank, models, extra={
        "label_field": label_field, "reference_tag": reference_tag})
    return {
        "bank": bank_name,
        "path": record["path"],
        "classes": class_rows,
        "unusable_classes": report.unusable(),  # annotated, but no reference usable
        "missing_classes": report.unannotated(),  # no annotation on the reference samples at all
        "num_references": len(bank),
        "num_skipped": len(report.skipped),
        "skipped": _capped(_skipped_records(report)),
    }


def _truth_of(sample, image_shape, label_field: str, classes: set) -> tuple[np.ndarray, list[str]]:
    """The annotated instances of ``classes`` on a reference sample: full masks (a box-only one as its box)."""
    h, w = image_shape
    masks, names = [], []
    labels = sample[label_field]
    for det in (labels.detections if labels is not None else []):
        if det.label not in classes or det.bounding_box is None:
            continue
        mask = detection_mask(det, h, w)
        if mask is None:
            x1, y1, x2, y2 = box_to_pixels(det.bounding_box, h, w)
            mask = np.zeros((h, w), dtype=bool)
            mask[y1:y2, x1:x2] = True
        masks.append(mask)
        names.append(det.label)
    return np.array(masks, dtype=bool).reshape(len(masks), h, w), names


def calibrate_thresholds(samples, *, bank_name: str = DEFAULT_BANK, label_field: str | None = None,
                         target_precision: float | None = 0.9, prompt_share: float | None = None,
                         device: str | None = None) -> dict:
    """Calibrate a bank on its reference samples (:func:`refseg.method.calibration.calibrate_bank`, what
    ``refseg calibrate`` runs): each is labelled with the bank minus its own references.

    ``target_precision`` (None: not now): per-class score thresholds reaching it, with the samples'
    ``label_field`` instances as the ground truth, so every instance of the bank's classes on the reference
    samples must be annotated (references a review added, from another field, do not make their
    samples held-out images); ``auto_label(class_thresholds=True)`` applies them. ``prompt_share`` (None: not
    now): the prompt-selection threshold keeping that share of the detections (no annotation needed; the
    bank's proposer must have prompt points); ``auto_label(prompt_selection=True)`` applies it. Both are stored
    with the bank and shown in its record (``thresholds``, ``prompt_threshold``); one not estimated now stays
    as it was. Returns the report: ``images``, ``failed``, ``lines``, the class part (``target_precision``,
    ``label_field``, ``classes``) and ``prompt_threshold`` when estimated."""
    dataset = fiftyone_access.root_dataset(samples)
    bank, record = load_bank(dataset, bank_name)
    field = None
    if target_precision is not None:  # the class thresholds need the ground truth
        field = label_field or record.get("label_field")
        if not field:
            raise ValueError("give the label field that holds the reference samples' annotations")
        check_detections_field(dataset, field, "ground-truth")
    # with a ground truth, only the samples whose references came from ``field``: references added from a
    # review (accepted or corrected predictions, their source field the predictions') sit on samples whose
    # instances are not all annotated in ``field``, and would count every other detection there as a false
    # positive
    by_sample: dict[str, list[str]] = {}
    for entry in bank.entries:
        if (not entry.negative and entry.source.get("sample_id")
                and (field is None or entry.source.get("field") in (None, field))):
            by_sample.setdefault(str(entry.source["sample_id"]), []).append(entry.id)
    if not by_sample:
        raise ValueError(f"bank {bank_name!r} names no reference sample of this dataset"
                         + (f" annotated in {field!r}" if field else "") + ": nothing to estimate from")
    models = RunSpec.from_dict(record["models"])
    models = models.with_changes(overrides=(*models.overrides, ("merge.class_thresholds", False)))
    device = resolve_device(device, dataset)
    segmenter = models.build_segmenter(bank, proposer=load_proposer(models, device),
                                       encoder=load_encoder(models, device))
    classes = set(bank.class_names)
    held_out, unreadable = [], []
    references = dataset.select(list(by_sample), ordered=True)
    for sample in (references.select_fields(field) if field else references.select_fields()).iter_samples():
        try:
            shape = image_size(sample.filepath)  # after EXIF rotation, like the masks' frame
        except ImageLoadError as exc:
            unreadable.append((sample.filepath, str(exc)))
            continue
        masks, names = _truth_of(sample, shape, field, classes) if field else (np.zeros((0, *shape), bool), [])
        held_out.append(HeldOutImage(sample.filepath, by_sample[sample.id], masks, names, name=sample.filepath))
    calibration = calibrate_bank(segmenter, held_out, target_precision, prompt_share)
    failed = [{"filepath": f, "error": e} for f, e in [*unreadable, *calibration.failed]]
    summary = {"images": calibration.images, "failed": failed, "lines": calibration.lines()}
    extra = {k: record[k] for k in ("label_field", "reference_tag", "thresholds", "prompt_threshold") if k in record}
    if calibration.thresholds is not None:
        report = calibration.thresholds
        extra["thresholds"] = {"target_precision": float(target_precision), "label_field": field,
                               "images": report.images, "classes": [t.to_dict() for t in report.classes.values()],
                               "failed": failed, "lines": report.lines()}
        summary.update({k: extra["thresholds"][k] for k in ("target_precision", "label_field", "classes")})
    if calibration.prompt is not None:
        extra["prompt_threshold"] = summary["prompt_threshold"] = {**calibration.prompt.to_dict(),
                                                                   "line": calibration.prompt.describe()}
    _save_bank(dataset, bank_name, bank, RunSpec.from_dict(record["models"]), extra=extra, updating=True)
    return summary


def update_memory_bank_from_review(samples, *, bank_name: str = DEFAULT_BANK,
                                   pred_field: str = DEFAULT_OUTPUT_FIELD, rejected_tag: str = DEFAULT_REJECTED_TAG,
                                   accepted_tag: str = DEFAULT_ACCEPTED_TAG, device: str | None = None,
                                   batch_size: int = DEFAULT_BANK_BATCH_SIZE, corrected_tag: str | None = None) -> dict:
    """Fold reviewed predictions back into a bank.

    Predictions in ``pred_field`` whose label tags include ``rejected_tag`` become
    negative references of their predicted class (a later proposal closer to one
    of them than to the class prototype is dropped); those tagged ``accepted_tag``
    become ordinary references. A prediction already in the bank (same label id)
    is not added twice. With ``corrected_tag`` (e.g. ``"corrected"``, see
    :func:`refseg_fiftyone.review.find_corrections`), detections a person corrected or
    added count as accepted: their (corrected) mask and box become the reference. Re-run :func:`auto_label` afterwards: the bank's digest
    changes, so every target is labelled again with the new bank.
    """
    dataset = _dataset_of(samples)
    check_detections_field(samples, pred_field, "prediction")
    tags = [t for t in (rejected_tag, accepted_tag, corrected_tag) if t]
    if not tags:
        raise ValueError("give the tag of rejected and/or accepted predictions")
    bank, record = load_bank(dataset, bank_name)
    models = RunSpec.from_dict(record["models"])
    device = resolve_device(device, dataset)
    encoder = load_encoder(models, device)
    bank.check_encoder(encoder.settings())
    builder = _bank_builder(models, device, encoder, bank, batch_size=batch_size)
    reviewed = samples.select_labels(tags=tags, fields=pred_field)
    already = 0
    for sample in reviewed.select_fields(pred_field).iter_samples():
        try:
            image = refseg.load_image(sample.filepath)
        except ImageLoadError as exc:
            builder.skip({"sample_id": sample.id}, None, str(exc))
            continue
        tags_by_id = {d.id: d.tags for d in sample[pred_field].detections}
        for ref in _references_of(sample, image, pred_field, None, builder):
            tags_of = tags_by_id[ref.source["label_id"]]
            is_rejected = rejected_tag in tags_of
            is_accepted = accepted_tag in tags_of or (bool(corrected_tag) and corrected_tag in tags_of
                                                      and not is_rejected)
            if is_rejected and is_accepted:
                builder.skip(ref.source, ref.class_name, "tagged both rejected and accepted")
                continue
            if bank.find(label_id=ref.source["label_id"]):
                already += 1
                continue
            ref.source["review"] = rejected_tag if is_rejected else (
                accepted_tag if accepted_tag in tags_of else corrected_tag)
            builder.add(ref, negative=is_rejected)
    bank, report = builder.finish()
    counts = {"negative": report.negatives, "positive": report.used}
    added = sum(sum(c.values()) for c in counts.values())
    if added:
        extra = {k: record[k] for k in ("label_field", "reference_tag") if k in record}
        record = _save_bank(dataset, bank_name, bank, models, extra=extra, updating=True)  # a clone: own file
    return {
        "bank": bank_name,
        "negatives_added": [{"class": c, "count": n} for c, n in counts["negative"].items()],
        "references_added": [{"class": c, "count": n} for c, n in counts["positive"].items()],
        "num_added": added,
        "already_in_bank": already,
        "num_skipped": len(report.skipped),
        "skipped": _capped(_skipped_records(report)),
        "counts": record["counts"],
    }


# ---------------------------------------------------------------------------- labelling


def run_key(segmenter) -> str:
    """Identity of a labelling run: the models with their weights' content, the bank's content and every
    setting (:mod:`refseg.method.identity`), as a short hash stored on every sample it labels."""
    return identity_key(segmenter.identity())


def _write_labels(sample, label_field: str, labels: fo.Detections) -> None:
    """Store one sample's labels (one atomic update: labels and run key together)."""
    sample[label_field] = labels
    sample.save()


def _targets(samples, reference_tag: str | None):
    return samples.match_tags(reference_tag, bool=False) if reference_tag else samples


# ---------------------------------------------------------------------------- shards and devices


def shard_of(sample_id: str, num_shards: int) -> int:
    """The shard (0-based) of a sample among ``num_shards``: a stable hash of its id modulo ``num_shards``.

    ``int(sha256(sample_id)[:16 hex digits], 16) % num_shards``: it depends on nothing but the
    id, so every worker, on every machine, computes the same partition without talking to
    the others; shards are disjoint, their union is the whole collection, their sizes are
    about equal, and a sample keeps its shard when others are added or deleted.
    """
    digest = hashlib.sha256(str(sample_id).encode()).hexdigest()
    return int(digest[:16], 16) % int(num_shards)


def check_shard(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    """``(num_shards, shard_index)`` validated (None: 1 shard, shard 0)."""
    n = 1 if num_shards is None else int(num_shards)
    i = 0 if shard_index is None else int(shard_index)
    if n < 1:
        raise ValueError(f"num_shards must be at least 1, not {n}")
    if not 0 <= i < n:
        raise ValueError(f"shard_index must be in 0..{n - 1} for {n} shard(s), not {i}")
    return n, i


def _in_shard(ids: list[str], num_shards: int, shard_index: int) -> list[str]:
    return ids if num_shards == 1 else [i for i in ids if shard_of(i, num_shards) == shard_index]


def shard_ids(samples, num_shards: int, shard_index: int) -> list[str]:
    """Ids of the samples of ``samples`` in shard ``shard_index`` of ``num_shards`` (in the collection's order)."""
    num_shards, shard_index = check_shard(num_shards, shard_index)
    return _in_shard(samples.values("id"), num_shards, shard_index)


def parse_devices(devices: str | Iterable[str] | None) -> list[str] | None:
    """The local devices of a run: None for the usual single device (the ``device`` argument).

    ``"all"``: every CUDA device (the CPU where there is none); ``"cuda:0,cuda:1"`` (or a
    list): those. Each named device must exist here (a ValueError says what there is).
    """
    from refseg.runtime.device_pool import local_devices

    if devices is None:
        return None
    if isinstance(devices, str):
        if not devices.strip():
            return None
        spec = devices.strip()
        names = local_devices("all" if spec.lower() == "all" else spec)
    else:
        names = [str(d).strip() for d in devices if str(d).strip()]
        if not names:
            return None
    return [str(select_device(d)) for d in names]


def prepare_auto_label(samples, *, bank_name: str = DEFAULT_BANK, label_field: str = DEFAULT_OUTPUT_FIELD) -> dict:
    """What every shard job needs before several run at once: the bank exists, the output field is declared.

    Declaring the field once, before the jobs are queued, keeps concurrent jobs from each
    adding it to the dataset's schema. Returns the bank's record.
    """
    dataset = _dataset_of(samples)
    record = bank_record(dataset, bank_name)
    _ensure_output_field(dataset, label_field)
    return record


def iter_auto_label(samples, *, bank_name: str = DEFAULT_BANK, label_field: str = DEFAULT_OUTPUT_FIELD,
                    reference_tag: str | None = DEFAULT_REFERENCE_TAG, batch_size: int = 1,
                    device: str | None = None, score_threshold: float | None = None, preset: str | None = None,
                    overrides: str | dict | None = None, existing: str = "resume", cache_candidates: bool = False,
                    num_shards: int = 1, shard_index: int = 0, devices: str | Iterable[str] | None = None,
                    class_thresholds: bool = False, prompt_selection: bool = False) -> Generator[Progress, None, dict]:
    """Label the samples (except those tagged ``reference_tag``) with a bank; yields progress, returns a report.

    ``existing`` decides what happens to samples whose ``label_field`` is already set:
    ``resume`` (default) skips those labelled by this very run (same bank content,
    models and settings) and relabels the rest, but leaves alone labels not written
    by refseg; ``skip_labelled`` skips every sample that has the field;
    ``overwrite`` relabels everything. Each sample is saved when done; a missing
    or unreadable image is reported and the others are labelled.

    ``cache_candidates`` keeps each image's proposals and features on disk
    (:class:`refseg.runtime.candidate_cache.CandidateCache` under :func:`candidate_dir`), so
    labelling again after the bank changed (review loop) or with other merge settings
    runs no network; the labels are the same as without the cache.

    ``num_shards`` / ``shard_index``: label only shard ``shard_index`` (0-based) of the
    targets, the samples whose :func:`shard_of` is ``shard_index``; the shards of one
    ``num_shards`` are disjoint and together are all targets, so ``num_shards`` jobs (on as
    many workers or machines) label every target once. The run key does not depend on the
    shards: resuming works within a shard and across shard counts.

    ``devices``: several local devices at once (``"all"``, ``"cuda:0,cuda:1"``), one worker
    process each (:class:`refseg.runtime.device_pool.DevicePool`); ``batch_size`` is then per device.
    None or "" (or a single device) labels in this process on ``device`` / that device. The
    workers share the candidate cache.

    ``class_thresholds`` / ``prompt_selection``: apply the bank's per-class thresholds / decode only the
    prompts near the bank (``proposal.prompt_similarity=bank``), both stored by :func:`calibrate_thresholds`;
    refused, before any model is loaded, when the bank has none or changed since.
    """
    if existing not in EXISTING_MODES:
        raise ValueError(f"existing must be one of {', '.join(EXISTING_MODES)}, not {existing!r}")
    num_shards, shard_index = check_shard(num_shards, shard_index)
    device_list = parse_devices(devices)
    if device_list is not None and len(device_list) == 1:
        device, device_list = device_list[0], None
    dataset = _dataset_of(samples)
    bank, record = load_bank(dataset, bank_name)
    models = RunSpec.from_dict(record["models"])
    extra_overrides = parse_overrides(overrides)
    if score_threshold is not None:
        extra_overrides += (("merge.score_threshold", float(score_threshold)),)
    where = f"memory bank {bank_name!r}"
    if class_thresholds:  # the bank's per-class thresholds (calibrate_thresholds); refused if none or stale
        stored_thresholds(bank, where)
        extra_overrides += (("merge.class_thresholds", True),)
    prompt_threshold = stored_prompt_threshold(bank, where) if prompt_selection else None  # the same
    if prompt_selection:
        extra_overrides += (("proposal.prompt_similarity", "bank"),)
    if preset or extra_overrides:
        models = models.with_changes(preset=preset, overrides=models.overrides + extra_overrides)
    _ensure_output_field(dataset, label_field)
    targets = _targets(samples, reference_tag)

    # the run's identity needs the models (their weights' content): build them first
    segmenter = cache = None
    if device_list is not None:
        from refseg.runtime.device_pool import DevicePool

        used_devices = device_list  # one worker process per device, each with its own proposer, encoder and bank
        segmenter = DevicePool(models, _bank_file(dataset, record, bank_name), device_list,
                               candidate_dir=_candidate_root(dataset) if cache_candidates else None)
        cache = segmenter.cache
    else:
        device = resolve_device(device, dataset)
        used_devices = [str(device)]
        segmenter = models.build_segmenter(bank, proposer=load_proposer(models, device),
                                           encoder=load_encoder(models, device))
        if cache_candidates:
            cache = CandidateCache.for_segmenter(_candidate_root(dataset), segmenter)
    report = {"bank": bank_name, "label_field": label_field,
              "shard": {"index": shard_index, "count": num_shards} if num_shards > 1 else None,
              "devices": used_devices, "status": "running"}
    if prompt_threshold is not None:
        report["prompt_threshold"] = prompt_threshold  # prompts decoded only at this similarity to the bank or more
    stats = LabelStats(total=0)
    try:
        report.update((yield from _label_targets(dataset, targets, segmenter, cache, label_field, bank_name, existing,
                                                 num_shards, shard_index, max(1, int(batch_size)) * len(used_devices),
                                                 report, stats)))
        report["status"] = "completed"
    except BaseException as exc:
        # killed by Ctrl-C, cancelled between batches (the generator closed), or failed: the samples saved so
        # far stay labelled, and the run record says how far the run got and how to go on
        interrupted = stats.interrupted or not isinstance(exc, Exception)
        report.update(_stats_report(stats), status="interrupted" if interrupted else "failed",
                      error=None if interrupted else f"{type(exc).__name__}: {exc}",
                      finished_at=_now(),
                      resume="run auto-label again with the same settings (a delegated job: fiftyone delegated rerun "
                             "<id>): the samples already labelled are not labelled again")
        raise
    finally:
        segmenter.close()  # a DevicePool stops its workers (a Segmenter holds nothing to release)
        report["cache"] = ({"path": str(cache.root), **{k: int(v) for k, v in cache.stats.items()}}
                           if cache is not None else None)
        _record_run(dataset, label_field, report)
    return report


def _stats_report(stats: LabelStats) -> dict:
    return {"num_labelled": stats.labelled, "num_failed": stats.failed}


def _label_targets(dataset: fo.Dataset, targets, segmenter, cache, label_field: str, bank_name: str, existing: str,
                   num_shards: int, shard_index: int, step: int, report: dict, stats: LabelStats
                   ) -> Generator[Progress, None, dict]:
    """Decide which targets this run labels (by its key, ``existing`` and the shard), then label them.

    ``report`` gets the run's key and counts before the labelling starts; ``stats`` is kept up to
    date by the loop (both say how far an interrupted run got)."""
    key = run_key(segmenter)
    # each shard job computes its part from the ids alone: no coordination between the jobs
    n_targets = len(targets) if num_shards == 1 else len(shard_ids(targets, num_shards, shard_index))

    def mine(ids_: list[str]) -> list[str]:
        return _in_shard(ids_, num_shards, shard_index)

    foreign = 0
    if existing == "resume":
        todo = targets.match(F(f"{label_field}.{RUN_ATTR}") != key)
        foreign_view = todo.exists(label_field).match(~F(f"{label_field}.{RUN_ATTR}").exists())
        foreign_ids = set(mine(foreign_view.values("id")))
        foreign = len(foreign_ids)
        ids = [i for i in mine(todo.values("id")) if i not in foreign_ids]
    elif existing == "skip_labelled":
        ids = mine(targets.exists(label_field, False).values("id"))
    else:
        ids = mine(targets.values("id"))
    report.update(run_key=key, num_targets=n_targets, num_already_done=n_targets - len(ids) - foreign,
                  num_foreign_skipped=foreign, started_at=_now())
    stats.total = len(ids)
    sink = _SampleSink(dataset, label_field, key, bank_name)
    yield Progress(0, stats.total, f"labelling {stats.total} sample(s)")
    # the next batch is read in a thread while the networks work on this one; control comes back after each batch
    for _ in label_stream(segmenter, batched(ids, step), sink, cache, stats):
        yield Progress(stats.done, stats.total, f"{stats.done}/{stats.total} samples labelled"
                       + (f", {stats.failed} failed" if stats.failed else ""))
    return {**_stats_report(stats), "num_instances": sink.instances, "failed": _capped(sink.failed),
            "finished_at": _now()}


class _SampleSink:
    """The FiftyOne sink of the labelling loop (:class:`refseg.runtime.labelling.LabelSink`): sample ids in,
    each labelled sample saved with the run's key, failures listed."""

    def __init__(self, dataset: fo.Dataset, label_field: str, key: str, bank_name: str):
        self.dataset, self.label_field, self.key, self.bank_name = dataset, label_field, key, bank_name
        self.failed: list[dict] = []
        self.instances = 0

    def open(self, batch: list[str]) -> list[tuple[Any, str]]:
        """The batch's samples (only the output field loaded) with their image files; runs in the reader thread."""
        samples = self.dataset.select(batch, ordered=True).select_fields(self.label_field).iter_samples()
        return [(sample, sample.filepath) for sample in samples]

    def name(self, sample) -> str:
        return sample.filepath

    def write(self, batch, labelled, failed) -> None:
        from .review import merge_with_review, stamp  # review builds on this module

        for sample, dets in labelled:
            labels = to_fiftyone_detections(dets, **{RUN_ATTR: self.key, BANK_ATTR: self.bank_name})
            stamp(labels.detections)  # a person's later edit is recognised by its changed fingerprint
            old = sample[self.label_field]
            if old is not None and old.detections:  # corrections and review decisions survive the re-label
                labels.detections, _ = merge_with_review(old.detections, labels.detections, *dets.compact.shape)
            _write_labels(sample, self.label_field, labels)
            self.instances += len(labels.detections)
        self.failed.extend({"sample_id": sample.id, "filepath": sample.filepath, "error": error}
                           for sample, error in failed)


def _candidate_root(dataset: fo.Dataset) -> Path:
    """The dataset's candidate caches: a sub-folder per models and stage-1 settings."""
    return candidate_dir(dataset) / _slug(dataset.name)




def _record_run(dataset: fo.Dataset, label_field: str, report: dict) -> None:
    """``info["refseg_runs"][label_field]`` = the report (the last run, or the last shard job to finish).

    One ``$set`` of that key alone in the dataset's document: shard jobs finishing at the
    same time on other workers cannot undo each other's (or anyone's) other changes to ``info``.
    """
    summary = {k: v for k, v in report.items() if k != "failed"}
    if fiftyone_access.set_info_entry(dataset, (RUNS_KEY, label_field), summary):
        return
    dataset.reload()
    info = dict(dataset.info or {})
    runs = dict(info.get(RUNS_KEY, {}) or {})
    runs[label_field] = summary
    info[RUNS_KEY] = runs
    dataset.info = info
    dataset.save()


def exhaust(generator: Generator[Progress, None, dict], progress: Callable[[Progress], None] | None = None) -> dict:
    """Run an ``iter_*`` generator to the end, passing each progress to ``progress``; returns its report."""
    while True:
        try:
            update = next(generator)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(update)


def auto_label(samples, progress: Callable[[Progress], None] | None = None, **kwargs) -> dict:
    """:func:`iter_auto_label` run to the end; returns its report."""
    return exhaust(iter_auto_label(samples, **kwargs), progress)


def prompt_masks(proposer, image, detections, config) -> tuple[list, int]:
    """Give each detection a mask from the proposer's prompt with its box (one proposer call for all of
    them), cropped to the box as FiftyOne stores masks. Returns the detections that got a mask and how many
    did not (a box too small or outside the image, or an empty mask)."""
    h, w = image.shape[:2]
    prompted, empty = [], 0
    for det in detections:
        x1, y1, x2, y2 = box_to_pixels(det.bounding_box, h, w)
        if x2 <= x1 or y2 <= y1 or box_problem(detection_box_pixels(det, h, w), h, w) is not None:
            empty += 1
        else:
            prompted.append(det)
    masks = masks_from_boxes(proposer, image, [detection_box_pixels(d, h, w) for d in prompted],
                             config.proposal.image_size, config.precision)
    masked = []
    for det, full in zip(prompted, masks):
        crop = mask_to_crop(full, det.bounding_box)
        if not crop.any():
            empty += 1
            continue
        det.mask, det.mask_path = crop, None
        masked.append(det)
    return masked, empty


def iter_boxes_to_masks(samples, *, label_field: str, out_field: str | None = None, models: RunSpec | None = None,
                        device: str | None = None, overwrite: bool = False) -> Generator[Progress, None, dict]:
    """Give box-only detections of ``label_field`` a mask from the proposer's box prompt.

    The box is kept and the mask is cropped to it (FiftyOne's layout). With
    ``out_field`` the result goes to a copy of the field; with ``overwrite``
    detections that already have a mask get a new one too.
    """
    dataset = _dataset_of(samples)
    check_detections_field(samples, label_field, "box")
    out_field = out_field or label_field
    if out_field != label_field:
        _ensure_output_field(dataset, out_field)
    models = models or default_run_spec(dataset)
    config = models.config()
    device = resolve_device(device, dataset)
    proposer = load_proposer(models, device)
    if overwrite or out_field != label_field:
        view = samples.exists(label_field)
    else:
        view = samples.filter_labels(label_field, F("mask").exists(False) & F("mask_path").exists(False))
    ids = view.values("id")
    total = len(ids)
    converted = empty = 0
    failed: list[dict] = []
    yield Progress(0, total, f"{total} sample(s) with boxes to segment")
    for i, sample in enumerate(dataset.select(ids, ordered=True).iter_samples(), start=1):
        try:
            image = refseg.load_image(sample.filepath)
        except ImageLoadError as exc:
            failed.append({"sample_id": sample.id, "filepath": sample.filepath, "error": str(exc)})
            continue
        h, w = image.shape[:2]
        labels = sample[label_field].copy() if out_field != label_field else sample[label_field]
        wanted = [d for d in labels.detections if (overwrite or not d.has_mask) and d.bounding_box is not None]
        masked, unmasked = prompt_masks(proposer, image, wanted, config)
        converted += len(masked)
        empty += unmasked
        _write_labels(sample, out_field, labels)
        yield Progress(i, total, f"{i}/{total} samples")
    return {"label_field": label_field, "out_field": out_field, "num_samples": total, "num_masks": converted,
            "num_empty": empty, "num_failed": len(failed), "failed": _capped(failed)}


def boxes_to_masks(samples, progress: Callable[[Progress], None] | None = None, **kwargs) -> dict:
    """:func:`iter_boxes_to_masks` run to the end; returns its report."""
    return exhaust(iter_boxes_to_masks(samples, **kwargs), progress)


# ---------------------------------------------------------------------------- evaluation and export


def evaluate_auto_labels(samples, *, pred_field: str = DEFAULT_OUTPUT_FIELD, gt_field: str,
                         eval_key: str = DEFAULT_EVAL_KEY, reference_tag: str | None = DEFAULT_REFERENCE_TAG,
                         iou: float = DEFAULT_IOU, use_masks: bool = True, only_labelled: bool = True) -> dict:
    """FiftyOne's COCO-style ``evaluate_detections`` of ``pred_field`` against ``gt_field``.

    Reference samples are left out (their labels made the bank); with
    ``only_labelled``, so are samples the labelling run has not reached yet.
    Returns ``mAP`` (COCO's mAP@[.50:.95]: AP averaged over the IoU thresholds 0.50,
    0.55, ..., 0.95, whatever ``iou`` is), ``mAP50`` (AP at IoU 0.50) and per class
    ``AP`` (@[.50:.95]) and ``AP50`` (-1 where a class has no ground truth); ``tp`` /
    ``fp`` / ``fn`` count the matches at ``iou``. The report is also kept in
    ``dataset.info["refseg_evals"][eval_key]`` with the time it was made, so the refseg
    panel can show the last evaluation after the result dialog is closed.
    """
    dataset = _dataset_of(samples)
    check_detections_field(samples, pred_field, "prediction")
    check_detections_field(samples, gt_field, "ground truth")
    view = _targets(samples, reference_tag)
    if only_labelled:
        view = view.exists(pred_field)
    if len(view) == 0:
        raise ValueError(f"no sample to evaluate: none has predictions in {pred_field!r}"
                         + (f" outside the {reference_tag!r} samples" if reference_tag else ""))
    if eval_key in dataset.list_evaluations():
        dataset.delete_evaluation(eval_key)
    results = view.evaluate_detections(pred_field, gt_field=gt_field, eval_key=eval_key, use_masks=use_masks,
                                       compute_mAP=True, iou=iou)
    # precision: IoU thresholds x classes x recall points, -1 for a class without ground truth
    at50 = results.precision[int(np.argmin(np.abs(results.iou_threshs - 0.5)))]
    ap50 = [float(row.mean()) if (row > -1).any() else -1.0 for row in at50]
    per_class = [{"class": str(c), "AP": float(results.mAP(classes=[c])), "AP50": ap50[i]}
                 for i, c in enumerate(results.classes)]
    present = [a for a in ap50 if a > -1]
    report = {
        "eval_key": eval_key,
        "mAP": float(results.mAP()),
        "mAP50": float(np.mean(present)) if present else -1.0,
        "classes": per_class,
        "num_samples": len(view),
        "tp": int(sum(view.values(f"{eval_key}_tp"))),
        "fp": int(sum(view.values(f"{eval_key}_fp"))),
        "fn": int(sum(view.values(f"{eval_key}_fn"))),
        "iou": float(iou),
        "pred_field": pred_field,
        "gt_field": gt_field,
        "use_masks": bool(use_masks),
        "evaluated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),  # to the microsecond: orders evaluations
    }
    # one $set of this entry (eval keys are field names: no '.' or '$'); an ``info[EVALS_KEY]`` that is not a
    # dict (written by something else) is replaced
    if not fiftyone_access.set_info_entry(dataset, (EVALS_KEY, eval_key), report):
        dataset.info = {**(dataset.info or {}), EVALS_KEY: {eval_key: report}}
        dataset.save()
    return report


def export_coco(samples, *, label_field: str, export_dir: str, mask_format: str = DEFAULT_MASK_FORMAT,
                export_media: bool = False,
                classes: list[str] | None = None) -> dict:
    """Write a COCO instances file of ``label_field`` (and copy the images if asked).

    ``mask_format="rle"``: lossless compressed RLE masks, written here
    (``<export_dir>/labels.json``, images under ``<export_dir>/data/`` or referenced
    by absolute path). ``"polygons"``: FiftyOne's own COCO exporter (polygons traced
    with a 2-pixel tolerance; holes are lost). Both load back with
    ``fo.Dataset.from_dir(dataset_type=fo.types.COCODetectionDataset, ...)``.
    """
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {', '.join(MASK_FORMATS)}, not {mask_format!r}")
    check_detections_field(samples, label_field, "export")
    export_dir = Path(export_dir).expanduser()
    export_dir.mkdir(parents=True, exist_ok=True)
    labels_path = export_dir / "labels.json"
    if classes is None:
        classes = sorted(c for c in samples.distinct(f"{label_field}.detections.label") if c is not None)
    if mask_format == "polygons":
        samples.export(export_dir=str(export_dir), dataset_type=fo.types.COCODetectionDataset,
                       label_field=label_field, export_media=export_media, abs_paths=not export_media,
                       classes=classes, overwrite=False)
        return {"labels_path": str(labels_path), "mask_format": mask_format, "num_images": len(samples),
                "data_path": str(export_dir / "data") if export_media else None}

    categories = [{"id": i + 1, "name": c, "supercategory": ""} for i, c in enumerate(classes)]
    cat_ids = {c: i + 1 for i, c in enumerate(classes)}
    data_dir = export_dir / "data"
    if export_media:
        data_dir.mkdir(exist_ok=True)
    names = fou.UniqueFilenameMaker(output_dir=str(data_dir) if export_media else None)
    images, annotations, failed = [], [], []
    for image_id, sample in enumerate(samples.select_fields(label_field).iter_samples(), start=1):
        try:
            h, w = image_size(sample.filepath)  # after EXIF rotation, like the masks' frame
        except ImageLoadError as exc:
            failed.append({"sample_id": sample.id, "filepath": sample.filepath, "error": str(exc)})
            continue
        if export_media:
            out = names.get_output_path(sample.filepath)
            shutil.copy2(sample.filepath, out)
            file_name = os.path.basename(out)
        else:
            file_name = os.path.abspath(sample.filepath)
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        labels = sample[label_field]
        for det in (labels.detections if labels is not None else []):
            if det.label not in cat_ids or det.bounding_box is None:
                continue
            bx, by, bw, bh = pixel_xywh(det.bounding_box, h, w)  # a COCO box comes back as it was imported
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_ids[det.label],
                   "bbox": [bx, by, bw, bh], "area": float(bw * bh), "iscrowd": 0}
            mask = detection_mask(det, h, w)
            if mask is not None:
                ann["segmentation"] = refseg.encode_rle(mask)
                ann["area"] = float(mask.sum())
            if det.confidence is not None:
                ann["score"] = float(det.confidence)
            annotations.append(ann)
    info = {"description": f"{_dataset_of(samples).name}: {label_field}", "date_created": _now()}
    write_json_atomic(labels_path, {"info": info, "images": images, "annotations": annotations,
                                    "categories": categories})
    return {"labels_path": str(labels_path), "mask_format": mask_format, "num_images": len(images),
            "num_annotations": len(annotations), "data_path": str(data_dir) if export_media else None,
            "num_failed": len(failed), "failed": _capped(failed)}


# ---------------------------------------------------------------------------- checks before a run, expected time


def run_spec_for_labelling(dataset: fo.Dataset, bank_name: str, preset: str | None = None,
                           overrides: str | dict | None = None) -> RunSpec:
    """The run specification an auto-label run with the bank would use (the bank's models and settings, then
    ``preset`` and ``overrides``); a :class:`~refseg.runtime.run_spec.RunSpecError` names a bad setting."""
    models = RunSpec.from_dict(bank_record(dataset, bank_name)["models"])
    extra = parse_overrides(overrides)
    if preset or extra:
        models = models.with_changes(preset=preset, overrides=models.overrides + extra)
    return models


def _official_checkpoint(name: str, role: str):
    """The official checkpoint of model ``name`` (None for an import path or an unknown name)."""
    from refseg.models.dinov2_encoder import dinov2_variant
    from refseg.models.sam2_proposer import sam2_variant

    if ":" in name:
        return None
    try:
        return (sam2_variant if role == "proposer" else dinov2_variant)(name).checkpoint
    except KeyError:  # UnknownName
        return None


def checkpoint_problem(spec: RunSpec, role: str) -> str | None:
    """Why the weights of the ``role`` model ("proposer" or "encoder") of ``spec`` cannot be had here without
    running anything: a checkpoint file that does not exist, or an official checkpoint that is not in the cache
    while offline (``REFSEG_OFFLINE``). None when they can (or random weights are asked for)."""
    from refseg.models import checkpoints

    if spec.random_init:
        return None
    name, path = (spec.proposer, spec.proposer_checkpoint) if role == "proposer" else (spec.encoder,
                                                                                        spec.encoder_checkpoint)
    if path:
        local = Path(path).expanduser()
        return None if local.is_file() else f"checkpoint file not found: {local}"
    official = _official_checkpoint(name, role)
    if official is None:
        return None
    target = checkpoints.get_cache_dir(spec.cache_dir) / official.filename
    if target.is_file() or not checkpoints.is_offline(spec.offline):
        return None
    return (f"{name}: checkpoint {official.filename} is not in the cache ({target.parent}) and refseg is offline "
            f"(REFSEG_OFFLINE): download it from {official.url} into that folder, give a local checkpoint file, "
            "or tick random weights to try the workflow")


# Seconds per image, from benchmarks/benchmark.py (random weights: the same compute as the real networks) on this
# project's 2-core x86 VM (CPU, torch 2.14, shared with other work, so figures vary by up to 2x): see "How long a
# run takes" in fiftyone_plugin/README.md for the measurements. Each network's part is scaled from where it was
# measured: the SAM2 image encoder by the input area (at proposal.image_size 1024: sam2.1_hiera_t 2.6 s, SAM2-L
# 15.2 s), the prompt decoder by the number of point prompts (points_per_side ** 2) times the input area (all SAM2
# sizes share the decoder: 0.12-0.25 s per prompt at 1024 px, 1024 prompts 122-252 s; the fast preset's decoder
# about 0.4x), DINOv2 by its input area (at 518: ViT-S 2.6-4.0 s, ViT-L 6.2 s). The figures lean to the slow
# side: an immediate run that outlives the App's operator timeout is killed. GPU figures were not measured here:
# they are deliberately high guesses (a recent NVIDIA GPU runs SAM2-L at 1024 px with a 32x32 grid in about a
# second per image).
SAM2_ENCODER_SECONDS = {  # per image at 1024 px
    "cpu": {"t": 3.0, "s": 4.0, "b+": 7.0, "l": 15.2},
    "cuda": {"t": 0.03, "s": 0.04, "b+": 0.06, "l": 0.12},
}
PROMPT_SECONDS = {"cpu": 0.2, "cuda": 0.001}  # per point prompt at 1024 px (the paper preset's decoder)
FAST_DECODER_FACTOR = 0.4
DINOV2_SECONDS = {  # per image at 518 px
    "cpu": {"s": 3.0, "b": 4.5, "l": 6.2, "g": 18.0},
    "cuda": {"s": 0.01, "b": 0.015, "l": 0.03, "g": 0.08},
}
TOY_SECONDS = 0.05  # refseg.testing's colour proposer + encoder on a small image
DEVICE_KIND = {"cpu": "cpu", "cuda": "cuda", "mps": "cuda"}  # which table a device type reads
MPS_SLOWDOWN = 5.0  # Apple GPUs: taken as 5x the CUDA guess
IMMEDIATE_SHARE = 0.5  # runs expected to take more than this share of the App's operator timeout are delegated


def _size_key(name: str, role: str) -> str | None:
    if role == "proposer":
        match = re.search(r"hiera_(t|s|b\+|l)$", name)
    else:
        match = re.search(r"vit([sblg])14(_reg)?$", name)
    return match.group(1) if match else None


def expected_seconds_per_image(spec: RunSpec, device, task: str = "label") -> float:
    """Expected seconds for one image of a ``task`` run: ``label`` (auto-label: proposals on a grid of points,
    features, matching), ``bank`` (a reference image: its features, and the SAM2 encoder for box-only ones) or
    ``boxes`` (boxes to masks: the SAM2 encoder and a few box prompts). An import path other than
    :mod:`refseg.testing`'s components counts as the default SAM2 / DINOv2 model of that role."""
    device_type = select_device(device).type
    kind = DEVICE_KIND.get(device_type, "cpu")
    slowdown = MPS_SLOWDOWN if device_type == "mps" else 1.0
    proposal = spec.config().proposal
    toy = [spec.proposer.startswith("refseg.testing:"), spec.encoder.startswith("refseg.testing:")]
    sam2 = _size_key(spec.proposer, "proposer") or _size_key(DEFAULT_PROPOSER, "proposer")
    dinov2 = _size_key(spec.encoder, "encoder") or _size_key(DEFAULT_ENCODER, "encoder")
    area = (proposal.image_size / 1024) ** 2
    encoder_s = 0.0 if toy[0] else SAM2_ENCODER_SECONDS[kind][sam2] * area
    prompt_s = PROMPT_SECONDS[kind] * area * (FAST_DECODER_FACTOR if proposal.fast_decoder else 1.0)
    decode_s = 0.0 if toy[0] else prompt_s * proposal.points_per_side ** 2
    features_s = 0.0 if toy[1] else DINOV2_SECONDS[kind][dinov2] * ((spec.encoder_input_size or 518) / 518) ** 2
    parts = {"label": encoder_s + decode_s + features_s, "bank": encoder_s + features_s,
             "boxes": encoder_s + 10 * prompt_s}[task]
    return (parts + TOY_SECONDS * any(toy)) * slowdown


def expected_seconds(spec: RunSpec, device, num_images: int, task: str = "label",
                     devices: list[str] | None = None) -> float:
    """Expected seconds of a ``task`` run over ``num_images`` images (see :func:`expected_seconds_per_image`) on
    ``device``, or on all of ``devices`` at once (:func:`parse_devices`): the images are shared evenly between
    them, so the slowest device's share takes longest."""
    num_images = max(0, int(num_images))
    if not devices:
        return expected_seconds_per_image(spec, device, task) * num_images
    share = -(-num_images // len(devices))
    return max(expected_seconds_per_image(spec, d, task) for d in devices) * share


def operator_timeout() -> int:
    """Seconds after which the App server stops an immediate operator run (``FIFTYONE_OPERATOR_TIMEOUT``, 600)."""
    return int(fo.config.operator_timeout or 600)


def can_schedule_delegated() -> bool:
    """Whether the App of open-source FiftyOne can queue a delegated run: only with
    ``FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS=true`` in the App server's environment (otherwise it offers an
    Enterprise orchestrator panel instead). From Python, delegated runs can always be queued."""
    return bool(fo.config.allow_legacy_orchestrators)


def expected_too_long(seconds: float) -> bool:
    """True when a run of ``seconds`` should not run immediately in the App (over :data:`IMMEDIATE_SHARE`
    of :func:`operator_timeout`: the estimate is rough)."""
    return seconds > IMMEDIATE_SHARE * operator_timeout()


def format_duration(seconds: float) -> str:
    """``"40 s"``, ``"12 min"``, ``"3.5 h"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
