"""Where a dataset's refseg work stands, as plain data: what the refseg panel of the App shows.

:func:`dataset_status` gathers, from the dataset alone (no models are loaded):

- ``banks``: each memory bank of ``info["refseg_banks"]`` with its references per class
  (positives, negatives), the thresholds stored with it (:func:`refseg_fiftyone.core.calibrate_thresholds`)
  and a few references per class to look at (the sample's file and the reference label's box, found
  from the bank entries' FiftyOne sources);
- ``runs``: the last labelling run per output field (``info["refseg_runs"]``) and the delegated
  jobs of this plugin on this dataset that are queued, scheduled or running (FiftyOne's
  delegated-operation queue), with their progress;
- ``review``: per output field, how many predictions there are and how many are tagged
  rejected / accepted;
- ``evaluation``: the last :func:`refseg_fiftyone.core.evaluate_auto_labels` report
  (``info["refseg_evals"]``): per-class AP@[.50:.95] and AP50, mAP@[.50:.95] and mAP50.

:func:`thumbnail_uri` turns one reference into a small PNG ``data:`` URI (the crop around its box),
which the App's image view shows without a media route.

:func:`take_job_end_notices` turns this plugin's delegated jobs that have ended since they were last
announced into the notifications the App shows (the panel while it watches a job, and the App when a
dataset opens): FiftyOne has no way for a worker to reach an open App, so the App asks.
"""

from __future__ import annotations

import base64
import io
from datetime import datetime, timedelta, timezone
from typing import Any

from refseg import ImageLoadError, MemoryBank, load_image
from refseg.method.prompt_selection import PromptThreshold

from . import core

THUMBNAILS_PER_CLASS = 3  # references shown per class and polarity
ACTIVE_STATES = ("queued", "scheduled", "running")  # delegated jobs still to finish
ENDED_STATES = ("completed", "failed")
ANNOUNCE_WITHIN = timedelta(days=7)  # an ended job older than this is not announced any more
ANNOUNCED_KEY = "announced_jobs"  # the execution store's list of the job ids already announced
MAX_ANNOUNCED = 500  # ids kept (the newest)


def dataset_status(dataset, thumbnails_per_class: int = THUMBNAILS_PER_CLASS, delegated: bool = True) -> dict:
    """Everything the refseg panel shows about ``dataset`` (see the module's docstring)."""
    dataset.reload()
    runs = list_runs(dataset)
    return {
        "dataset": dataset.name,
        "banks": [bank_summary(dataset, name, thumbnails_per_class) for name in sorted(core.list_banks(dataset))],
        "runs": runs,
        "jobs": active_jobs(dataset) if delegated else [],
        "review": review_counts(dataset, [r["label_field"] for r in runs]),
        "evaluation": last_evaluation(dataset),
    }


# ---------------------------------------------------------------------------- banks


def bank_summary(dataset, bank_name: str, thumbnails_per_class: int = THUMBNAILS_PER_CLASS) -> dict:
    """One bank: its models, references per class (positives, negatives), its stored thresholds and
    references to show.

    The counts and thresholds are the record's (written with the bank; ``class_thresholds`` and
    ``prompt_threshold`` are one line each, None when none is stored); the references come from the bank
    file's entries. A file that cannot be read (missing, replaced) gives ``error`` and no references."""
    record = core.bank_record(dataset, bank_name)
    prompt = recorded_prompt_threshold(record)
    summary = {"name": bank_name, "encoder": record.get("encoder"), "proposer": record.get("proposer"),
               "preset": record.get("preset"), "updated_at": record.get("updated_at"),
               "counts": [{"class": c["class"], "positives": int(c.get("references", 0)),
                           "negatives": int(c.get("negatives", 0))} for c in record.get("counts", [])],
               "class_thresholds": class_thresholds_text(record["thresholds"]) if record.get("thresholds") else None,
               "prompt_threshold": prompt_threshold_text(prompt) if prompt is not None else None,
               "references": [], "error": None}
    try:
        bank, _ = core.load_bank(dataset, bank_name)
    except (OSError, ValueError) as exc:
        summary["error"] = str(exc)
        return summary
    summary["references"] = reference_examples(dataset, bank, thumbnails_per_class)
    return summary


def class_thresholds_text(thresholds: dict) -> str:
    """A bank record's ``thresholds`` in one line: the target precision and each class's threshold (or why
    it has none)."""
    return (f"target precision {thresholds['target_precision']}: "
            + "; ".join(f"{c['class_name']} {c['threshold']:.2f}" if c["threshold"] is not None
                        else f"{c['class_name']} {c['status']}" for c in thresholds["classes"]))


def recorded_prompt_threshold(record: dict) -> dict | None:
    """The prompt threshold a bank record holds (``prompt_threshold``), None when none was stored or the
    estimate found none. A record holds it only while it fits the bank: updating the bank drops it."""
    prompt = record.get("prompt_threshold") or {}
    return prompt if prompt.get("threshold") is not None else None


def prompt_threshold_text(prompt: dict) -> str:
    """A recorded prompt threshold in one line: the threshold, and what it kept on the references."""
    return PromptThreshold.from_dict(prompt).describe()


def reference_examples(dataset, bank: MemoryBank, per_class: int = THUMBNAILS_PER_CLASS) -> list[dict]:
    """Up to ``per_class`` positive and as many negative entries per class, each with the file of its
    sample and the box of its label (``bounding_box``: FiftyOne's relative ``[x, y, w, h]``); entries whose
    sample or label is gone from the dataset are left out."""
    chosen, seen = [], {}
    for entry in bank.entries:
        key = (entry.class_name, entry.negative)
        source = entry.source or {}
        if seen.get(key, 0) >= per_class or not source.get("sample_id") or not source.get("label_id"):
            continue
        seen[key] = seen.get(key, 0) + 1
        chosen.append(entry)
    by_sample: dict[str, list] = {}
    for entry in chosen:
        by_sample.setdefault(entry.source["sample_id"], []).append(entry)
    found = {}
    fields = sorted({e.source.get("field") for e in chosen if e.source.get("field")})
    view = dataset.select(list(by_sample)).select_fields(fields) if fields else dataset.select(list(by_sample))
    for sample in view.iter_samples():
        for entry in by_sample[sample.id]:
            field = entry.source.get("field")
            labels = sample[field] if field and sample.has_field(field) else None
            det = next((d for d in (labels.detections if labels is not None else []) if d.id == entry.source["label_id"]),
                       None)
            if det is not None and det.bounding_box is not None:
                found[entry.id] = {"class": entry.class_name, "negative": entry.negative, "sample_id": sample.id,
                                   "label_id": det.id, "field": field, "filepath": sample.filepath,
                                   "bounding_box": [float(v) for v in det.bounding_box],
                                   "review": entry.source.get("review")}
    return [found[e.id] for e in chosen if e.id in found]


def thumbnail_uri(filepath: str, bounding_box, size: int = 96, margin: float = 0.15) -> str | None:
    """A ``data:image/png`` URI of the crop around ``bounding_box`` (relative ``[x, y, w, h]``, grown by
    ``margin`` of its size on each side), at most ``size`` pixels on its longer side; None if the image
    cannot be read."""
    from PIL import Image

    try:
        image = Image.fromarray(load_image(filepath))
    except (ImageLoadError, OSError):
        return None
    width, height = image.size
    x, y, w, h = bounding_box
    dx, dy = w * margin, h * margin
    left, top = max(0, int((x - dx) * width)), max(0, int((y - dy) * height))
    right, bottom = min(width, int(round((x + w + dx) * width))), min(height, int(round((y + h + dy) * height)))
    crop = image.crop((left, top, max(right, left + 1), max(bottom, top + 1)))
    crop.thumbnail((size, size))
    buffer = io.BytesIO()
    crop.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------- runs and jobs


def list_runs(dataset) -> list[dict]:
    """The last run per output field: status, how far it got (``done`` of ``total`` targets: already done
    plus labelled now), failures, bank and devices."""
    runs = []
    for field, run in sorted(((dataset.info or {}).get(core.RUNS_KEY) or {}).items()):
        if not isinstance(run, dict):
            continue
        total = int(run.get("num_targets") or 0)
        runs.append({"label_field": field, "status": run.get("status", "unknown"), "bank": run.get("bank"),
                     "done": int(run.get("num_already_done") or 0) + int(run.get("num_labelled") or 0),
                     "total": total, "labelled": int(run.get("num_labelled") or 0),
                     "failed": int(run.get("num_failed") or 0), "instances": run.get("num_instances"),
                     "devices": list(run.get("devices") or []), "shard": run.get("shard"),
                     "finished_at": run.get("finished_at"), "error": run.get("error")})
    return runs


def active_jobs(dataset) -> list[dict]:
    """This plugin's delegated jobs on ``dataset`` that have not finished (queued, scheduled, running),
    oldest first, with their progress (``progress``: 0..1 or None, ``progress_label``)."""
    jobs = [{**job, "progress": getattr(doc.status, "progress", None),
             "progress_label": getattr(doc.status, "label", None),
             "queued_at": _iso(doc.queued_at), "started_at": _iso(doc.started_at)}
            for doc, job in _plugin_jobs(dataset, ACTIVE_STATES)]
    return sorted(jobs, key=lambda j: j["queued_at"] or "")


def ended_jobs(dataset, since: datetime | None = None) -> list[dict]:
    """This plugin's delegated jobs on ``dataset`` that completed or failed (after ``since``, UTC, if given),
    oldest first: id, operator, state, label field, shard, when it ended, and its summary or error."""
    jobs = []
    for doc, job in _plugin_jobs(dataset, ENDED_STATES):
        ended = (doc.completed_at if job["state"] == "completed" else doc.failed_at) or doc.updated_at
        if since is not None and ended is not None and _utc(ended) < _utc(since):
            continue
        report = getattr(doc.result, "result", None)
        jobs.append({**job, "ended_at": _iso(ended),
                     "summary": report.get("summary") if isinstance(report, dict) else None,
                     "error": getattr(doc.result, "error", None)})
    return sorted(jobs, key=lambda j: j["ended_at"] or "")


def job_end_message(job: dict) -> str:
    """One sentence on how a delegated job ended, and what to do if it failed."""
    what = job["operator"].replace("_", "-")
    if job["label_field"]:
        what += f" into '{job['label_field']}'"
    if job["num_shards"]:
        what += f" (shard {int(job['shard_index']) + 1}/{job['num_shards']})"
    if job["state"] == "completed":
        return f"delegated {what} completed" + (f": {job['summary']}" if job["summary"] else "")
    error = (job["error"] or "no error recorded").strip().splitlines()
    error = error[-1] if error else "no error recorded"  # a traceback's last line says what went wrong
    return (f"delegated {what} failed: {error}. `fiftyone delegated rerun {job['id']}` resumes it "
            "(finished samples are kept)")


def take_job_end_notices(dataset, store, now: datetime | None = None) -> list[dict]:
    """The ended jobs (:func:`ended_jobs`, at most :data:`ANNOUNCE_WITHIN` old) not announced yet, each with
    its ``message``; they are recorded in ``store`` (an execution store of the dataset: ``get``/``set``) as
    announced, so that each job is announced once."""
    now = now or datetime.now(timezone.utc)
    announced = list(store.get(ANNOUNCED_KEY) or [])
    seen = set(announced)
    fresh = [dict(job, message=job_end_message(job)) for job in ended_jobs(dataset, since=now - ANNOUNCE_WITHIN)
             if job["id"] not in seen]
    if fresh:
        store.set(ANNOUNCED_KEY, (announced + [job["id"] for job in fresh])[-MAX_ANNOUNCED:])
    return fresh


def _utc(value: datetime) -> datetime:
    """FiftyOne stores naive UTC datetimes."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def _plugin_jobs(dataset, states: tuple[str, ...]):
    """Each of this plugin's delegated jobs on ``dataset`` in one of ``states``: its document, and what
    every job row shows (id, operator, state, label field, shard)."""
    from fiftyone.operators.delegated import DelegatedOperationService

    service = DelegatedOperationService()
    for state in states:
        for doc in service.list_operations(dataset_name=dataset.name, run_state=state):
            if not str(doc.operator).startswith(core.PLUGIN_NAME + "/"):
                continue
            params = _request_params(doc).get("params") or {}
            yield doc, {"id": str(doc.id), "operator": doc.operator.rsplit("/", 1)[-1], "state": doc.run_state,
                        "label_field": params.get("label_field"), "shard_index": params.get("shard_index"),
                        "num_shards": params.get("num_shards")}


def _request_params(doc) -> dict:
    context = getattr(doc, "context", None)
    return dict(getattr(context, "request_params", None) or {})


def _iso(value: Any) -> str | None:
    return value.isoformat(timespec="seconds") if hasattr(value, "isoformat") else value


# ---------------------------------------------------------------------------- review and evaluation


def review_counts(dataset, fields: list[str], rejected_tag: str = core.DEFAULT_REJECTED_TAG,
                  accepted_tag: str = core.DEFAULT_ACCEPTED_TAG) -> list[dict]:
    """Per output field (that the dataset still has): predictions, and how many are tagged rejected /
    accepted (label tags, the review the bank learns from)."""
    counts = []
    for field in fields:
        if not dataset.has_sample_field(field):
            continue
        tags = dataset.count_label_tags(label_fields=field)
        counts.append({"field": field, "predictions": int(dataset.count(f"{field}.detections")),
                       "rejected": int(tags.get(rejected_tag, 0)), "accepted": int(tags.get(accepted_tag, 0))})
    return counts


def last_evaluation(dataset) -> dict | None:
    """The most recent stored :func:`core.evaluate_auto_labels` report whose evaluation FiftyOne still has,
    or None."""
    evals = (dataset.info or {}).get(core.EVALS_KEY) or {}
    existing = set(dataset.list_evaluations())
    reports = [r for key, r in evals.items() if isinstance(r, dict) and key in existing]
    return max(reports, key=lambda r: r.get("evaluated_at") or "") if reports else None
