"""The refseg panel of the App: one place to follow a dataset's refseg work.

It shows what :func:`refseg_fiftyone.status.dataset_status` gathers: the memory banks
(references per class, positives and negatives, the thresholds stored with them, and crops of a
few references), the
labelling runs (the last one per output field, and the delegated jobs still queued or
running), the review counts and the last evaluation with per-class AP@[.50:.95] and AP50.
It reads the dataset when it opens, when the dataset changes and when Refresh is pressed. A timer looks at
the plugin's delegated jobs (every 5 s while one is queued or running, every 15 s otherwise): a new job or a
job's progress is shown, and when a job ends a notification says how it ended (what to do if it failed), the
panel reads the dataset again and the grid is reloaded.
"""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from refseg_fiftyone import core, status

PANEL_NAME = "refseg_panel"
STORE_NAME = "refseg"  # the dataset's execution store: which ended jobs were announced
POLL_MS = 5000  # how often the panel looks at the delegated jobs while one is queued or running
IDLE_POLL_MS = 15000  # and while none is (a job queued from a form then shows up)
# FiftyOne 1.22's App caches a sample it has shown in its sample view (the Relay record "<id>-modal" behind the
# modalSample selector) and reload_dataset / reload_samples / set_view do not refetch it: this JavaScript
# operator (fiftyone_plugin/refseg_app.js) rewrites those records with the samples' current documents
REFRESH_SAMPLE_VIEWS = f"{core.PLUGIN_NAME}/refresh_sample_views"


def _table(panel, name: str, columns: list[tuple[str, str]]) -> None:
    """A table whose rows are the panel data ``name``: ``columns`` are (row key, heading)."""
    table = types.TableView()
    for key, heading in columns:
        table.add_column(key, label=heading)
    panel.list(name, types.Object(), view=table)


def _score(value) -> str:
    return "n/a" if value is None or value < 0 else f"{value:.3f}"


def announce_ended_jobs(ctx) -> int:
    """Notify the App of this plugin's delegated jobs on the dataset that ended and were not announced yet
    (one notification, an error if any failed); returns how many."""
    notices = status.take_job_end_notices(ctx.dataset, ctx.store(STORE_NAME))
    if notices:
        failed = any(n["state"] == "failed" for n in notices)
        ctx.ops.notify("refseg: " + " · ".join(n["message"] for n in notices), variant="error" if failed
                       else "success")
    return len(notices)


def _run_rows(info: dict) -> list[dict]:
    rows = [{"field": r["label_field"], "status": r["status"], "done": f"{r['done']}/{r['total']}",
             "failed": str(r["failed"]), "device": ", ".join(r["devices"]) or "-", "bank": r["bank"] or "-"}
            for r in info["runs"]]
    for job in info["jobs"]:
        shard = f" (shard {job['shard_index'] + 1}/{job['num_shards']})" if job["num_shards"] else ""
        progress = (f"{job['progress']:.0%}" if job["progress"] is not None else "-") + (
            f" {job['progress_label']}" if job["progress_label"] else "")
        rows.append({"field": job["label_field"] or "-", "status": f"delegated {job['operator']}: {job['state']}"
                     + shard, "done": progress, "failed": "-", "device": "worker", "bank": "-"})
    return rows


class RefsegPanel(foo.Panel):
    @property
    def config(self):
        return foo.PanelConfig(name=PANEL_NAME, label="refseg", surfaces="grid",
                               help_markdown="Memory banks, labelling runs, review and the last evaluation of "
                                             "refseg on this dataset")

    def on_load(self, ctx):
        self._load(ctx)

    def on_change_dataset(self, ctx):
        self._load(ctx)

    def refresh(self, ctx):
        self._load(ctx)

    def poll(self, ctx):
        """The timer's call: announce the jobs that ended; read everything again when a job ended or the set
        of queued and running jobs changed, else only the runs table (the jobs' progress)."""
        if ctx.dataset is None:
            return
        ended = announce_ended_jobs(ctx)
        jobs = status.active_jobs(ctx.dataset)
        if ended or [j["id"] for j in jobs] != (ctx.panel.get_state("outline") or {}).get("job_ids"):
            self._load(ctx)
            if ended:  # the grid, the counts and the sample views opened before show the new labels
                ctx.ops.reload_dataset()
                ctx.trigger(REFRESH_SAMPLE_VIEWS)
        else:
            ctx.dataset.reload()
            ctx.panel.set_data("runs", _run_rows({"runs": status.list_runs(ctx.dataset), "jobs": jobs}))

    def _load(self, ctx):
        """Read the dataset's status: the layout's outline into the panel state, tables and images into its data."""
        if ctx.dataset is None:
            ctx.panel.set_state("outline", None)
            return
        info = status.dataset_status(ctx.dataset)
        banks = []
        for i, bank in enumerate(info["banks"]):
            ctx.panel.set_data(f"bank_{i}_counts", [{"class": c["class"], "positives": str(c["positives"]),
                                                     "negatives": str(c["negatives"])} for c in bank["counts"]])
            thumbs = []
            for j, ref in enumerate(bank["references"]):
                uri = status.thumbnail_uri(ref["filepath"], ref["bounding_box"])
                if uri is not None:  # at the path of its image property (see _render_banks)
                    ctx.panel.set_data(f"bank_{i}_refs.ref_{j}.image", uri)
                thumbs.append({"image": uri is not None, "class": ref["class"], "negative": ref["negative"],
                               "filepath": ref["filepath"]})
            banks.append({"name": bank["name"], "encoder": bank["encoder"], "error": bank["error"],
                          "class_thresholds": bank["class_thresholds"], "prompt_threshold": bank["prompt_threshold"],
                          "thumbs": thumbs})
        ctx.panel.set_data("runs", _run_rows(info))
        ctx.panel.set_data("review", [{k: str(v) for k, v in r.items()} for r in info["review"]])
        evaluation = info["evaluation"]
        if evaluation:
            ctx.panel.set_data("evaluation", [{"class": c["class"], "ap": _score(c["AP"]), "ap50": _score(c["AP50"])}
                                              for c in evaluation["classes"]])
            evaluation = {k: evaluation[k] for k in ("eval_key", "mAP", "mAP50", "num_samples", "tp", "fp", "fn",
                                                     "iou", "pred_field", "gt_field", "evaluated_at")}
        ctx.panel.set_state("outline", {"banks": banks, "has_runs": bool(info["runs"] or info["jobs"]),
                                        "job_ids": [j["id"] for j in info["jobs"]], "has_review": bool(info["review"]),
                                        "evaluation": evaluation})

    def render(self, ctx):
        panel = types.Object()
        panel.btn("refresh", label="Refresh", icon="refresh", on_click=self.refresh, variant="outlined")
        outline = ctx.panel.get_state("outline")
        if not outline:
            panel.md("No dataset loaded.", name="empty")
            return types.Property(panel, view=types.GridView(orientation="vertical"))
        self._render_banks(panel, outline["banks"])
        panel.md("#### Labelling runs", name="runs_heading")
        if outline["has_runs"]:
            _table(panel, "runs", [("field", "Output field"), ("status", "Status"), ("done", "Done / total"),
                                   ("failed", "Failed"), ("device", "Device"), ("bank", "Bank")])
        else:
            panel.md("No labelling run yet: run **refseg: auto-label**.", name="runs_none")
        if outline["job_ids"]:
            panel.md(f"Watching {len(outline['job_ids'])} delegated job(s): this panel tells you when each ends.",
                     name="jobs_watching")
        else:
            panel.md("No delegated refseg job queued or running.", name="jobs_none")
        panel.view("jobs_timer", types.TimerView(interval=POLL_MS if outline["job_ids"] else IDLE_POLL_MS,
                                                 on_interval=self.poll))
        panel.md("#### Review", name="review_heading")
        if outline["has_review"]:
            _table(panel, "review", [("field", "Predictions field"), ("predictions", "Predictions"),
                                     ("rejected", "Rejected"), ("accepted", "Accepted")])
        else:
            panel.md("Nothing labelled to review yet.", name="review_none")
        self._render_evaluation(panel, outline["evaluation"])
        return types.Property(panel, view=types.GridView(orientation="vertical", gap=1, align_x="left"))

    @staticmethod
    def _render_banks(panel, banks: list[dict]) -> None:
        panel.md("#### Memory banks", name="banks_heading")
        if not banks:
            panel.md("No memory bank yet: tag a few annotated samples `reference` and run "
                     "**refseg: build memory bank**.", name="banks_none")
        for i, bank in enumerate(banks):
            panel.md(f"**{bank['name']}** ({bank['encoder']})", name=f"bank_{i}_title")
            _table(panel, f"bank_{i}_counts", [("class", "Class"), ("positives", "Positives"),
                                               ("negatives", "Negatives")])
            if bank.get("class_thresholds"):
                panel.md(f"Class thresholds: {bank['class_thresholds']}", name=f"bank_{i}_class_thresholds")
            if bank.get("prompt_threshold"):
                panel.md(f"Prompt threshold: {bank['prompt_threshold']}", name=f"bank_{i}_prompt_threshold")
            if bank["error"]:
                panel.md(f"References cannot be shown: {bank['error']}", name=f"bank_{i}_error")
                continue
            row = panel.h_stack(f"bank_{i}_refs", gap=1, align_y="top")
            for j, thumb in enumerate(bank["thumbs"]):
                cell = row.v_stack(f"ref_{j}", gap=0)
                caption = f"{thumb['class']}{' (negative)' if thumb['negative'] else ''}"
                if thumb["image"]:
                    # the image source is the panel data at this property's path
                    cell.img("image", height="72px", alt_text=f"{caption}: {thumb['filepath']}")
                cell.md(caption, name=f"caption_{j}")

    @staticmethod
    def _render_evaluation(panel, evaluation: dict | None) -> None:
        panel.md("#### Last evaluation", name="eval_heading")
        if not evaluation:
            panel.md("No evaluation yet: run **refseg: evaluate auto-labels**.", name="eval_none")
            return
        panel.md(f"`{evaluation['eval_key']}`: `{evaluation['pred_field']}` against `{evaluation['gt_field']}` on "
                 f"{evaluation['num_samples']} sample(s), {evaluation['evaluated_at'][:19].replace('T', ' ')} UTC\n\n"
                 f"**mAP@[.50:.95]** {_score(evaluation['mAP'])} (COCO: AP averaged over IoU 0.50, 0.55, ..., 0.95) "
                 f"· **mAP50** {_score(evaluation['mAP50'])} (AP at IoU 0.50)\n\n"
                 f"TP {evaluation['tp']}, FP {evaluation['fp']}, FN {evaluation['fn']} matched at IoU "
                 f"{evaluation['iou']:g}", name="eval_summary")
        _table(panel, "evaluation", [("class", "Class"), ("ap", "AP@[.50:.95]"), ("ap50", "AP50")])
