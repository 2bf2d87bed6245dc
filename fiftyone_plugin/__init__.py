"""FiftyOne operators of refseg: reference-based instance segmentation in the App.

Workflow: tag a few annotated samples ``reference`` -> ``build_memory_bank`` ->
``auto_label`` the rest -> review (tag predictions ``rejected`` / ``accepted``) ->
``update_memory_bank_from_review`` -> ``auto_label`` again -> ``evaluate_auto_labels``
/ ``export_coco``. ``boxes_to_masks`` turns box annotations into masks.

Each operator is a thin shell: it reads its form into arguments of a function of
:mod:`refseg_fiftyone.core`, where the work happens. Each is also a Python function::

    import fiftyone.operators as foo
    build = foo.get_operator("@refseg/refseg/build_memory_bank")
    build(dataset, label_field="ground_truth", proposer="sam2.1_hiera_t", encoder="dinov2_vits14")
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import sys
import traceback

import fiftyone.operators as foo
import fiftyone.operators.types as types

from refseg.method.config import PRESETS
from refseg.models.registry import encoder_names
from refseg.models.sam2_proposer import SAM2_VARIANTS
from refseg.runtime.run_spec import RunSpecError
from refseg_fiftyone import core, fiftyone_access, review
from refseg_fiftyone.status import class_thresholds_text, prompt_threshold_text, recorded_prompt_threshold

from .panel import REFRESH_SAMPLE_VIEWS, RefsegPanel, announce_ended_jobs

# the model registries' names (the default first); any import path package.module:Class works too
PROPOSER_CHOICES = tuple(dict.fromkeys([core.DEFAULT_PROPOSER, *SAM2_VARIANTS]))
ENCODER_CHOICES = tuple(dict.fromkeys([core.DEFAULT_ENCODER, *encoder_names()]))
PRESET_CHOICES = tuple(PRESETS)


# ---------------------------------------------------------------------------- shared form pieces


def _default_scope(ctx) -> str:
    if ctx.selected:
        return "SELECTED_SAMPLES"
    if ctx.has_custom_view:
        return "CURRENT_VIEW"
    return "DATASET"


def _scope_input(ctx, inputs, description: str) -> None:
    choices = types.RadioGroup()
    choices.add_choice("DATASET", label="Entire dataset")
    choices.add_choice("CURRENT_VIEW", label="Current view")
    choices.add_choice("SELECTED_SAMPLES", label=f"Selected samples ({len(ctx.selected)})")
    inputs.enum("scope", choices.values(), default=_default_scope(ctx), label="Samples",
                description=description, view=choices)


def _scope_view(ctx):
    scope = ctx.params.get("scope") or _default_scope(ctx)
    if scope == "SELECTED_SAMPLES":
        return ctx.view.select(ctx.selected)
    if scope == "CURRENT_VIEW":
        return ctx.view
    return ctx.dataset


def _detections_fields(ctx) -> list[str]:
    import fiftyone as fo

    if ctx.dataset is None:
        return []
    schema = ctx.dataset.get_field_schema(embedded_doc_type=fo.Detections)
    return sorted(schema)


def _field_input(ctx, inputs, name: str, label: str, description: str, default: str | None = None,
                 required: bool = True) -> str | None:
    """A Detections field of the dataset; a name that is not one makes the form invalid, with the reason."""
    fields = _detections_fields(ctx)
    choices = types.AutocompleteView()
    for f in fields:
        choices.add_choice(f, label=f)
    if default not in fields:
        default = fields[0] if fields else None
    prop = inputs.str(name, default=default, required=required, label=label, description=description, view=choices)
    value = ctx.params.get(name, default)
    if not value:
        if not fields:
            inputs.view(f"{name}_missing", types.Warning(label=f"{label}: the dataset has no Detections field"))
        return None
    try:
        core.check_detections_field(ctx.dataset, value, label.lower())
    except ValueError as exc:
        prop.invalid = True
        prop.error_message = str(exc)
        return None
    return value


def _bank_input(ctx, inputs) -> str | None:
    banks = core.list_banks(ctx.dataset) if ctx.dataset is not None else {}
    if not banks:
        prop = inputs.view("no_bank", types.Warning(label="No memory bank yet",
                                                    description="Run 'refseg: build memory bank' first."))
        prop.invalid = True
        prop.error_message = (f"dataset {getattr(ctx.dataset, 'name', None)!r} has no memory bank: tag a few annotated "
                              "samples 'reference' and run 'refseg: build memory bank' first")
        return None
    choices = types.DropdownView()
    for name, record in sorted(banks.items()):
        counts = ", ".join(f"{c['class']}: {c['references']}" + (f" (-{c['negatives']})" if c['negatives'] else "")
                           for c in record.get("counts", []))
        choices.add_choice(name, label=name, description=f"{record.get('encoder')} | {counts}")
    default = core.DEFAULT_BANK if core.DEFAULT_BANK in banks else sorted(banks)[0]
    prop = inputs.enum("bank_name", choices.values(), default=default, label="Memory bank", view=choices)
    name = ctx.params.get("bank_name", default)
    if name not in banks:
        prop.invalid = True
        prop.error_message = (f"dataset {ctx.dataset.name!r} has no memory bank named {name!r} "
                              f"(banks: {', '.join(sorted(banks))})")
        return None
    return name


RANDOM_WEIGHTS_WARNING = ("Random weights: the networks are not trained, so the labels are meaningless. "
                          "Use this to try the workflow without downloading checkpoints.")


def _proposer_inputs(ctx, inputs, settings: core.RunSpec) -> dict:
    """The proposal model and its checkpoint; returns {"proposer": the checkpoint property}."""
    proposers = types.AutocompleteView()
    for name in PROPOSER_CHOICES:
        proposers.add_choice(name, label=name)
    inputs.str("proposer", default=settings.proposer, label="Proposal model",
               description="SAM2 model name, or an import path package.module:Class", view=proposers)
    checkpoint = inputs.str("proposer_checkpoint", default=None, label="Proposal model checkpoint",
                            description="Local weights file (optional; default: cache, downloaded once)")
    return {"proposer": checkpoint}


def _random_init_input(ctx, inputs) -> None:
    inputs.bool("random_init", default=False, label="Random weights (try the workflow; labels are meaningless)",
                description="Untrained networks, no checkpoint needed", view=types.CheckboxView())
    if ctx.params.get("random_init"):
        inputs.view("random_init_warning", types.Warning(label=RANDOM_WEIGHTS_WARNING))


def _model_inputs(ctx, inputs) -> dict:
    """Models, checkpoints, random weights, preset and overrides; returns the properties that
    :func:`_check_models` marks invalid."""
    settings = core.default_run_spec(ctx.dataset)
    props = _proposer_inputs(ctx, inputs, settings)
    encoders = types.AutocompleteView()
    for name in ENCODER_CHOICES:
        encoders.add_choice(name, label=name)
    inputs.str("encoder", default=settings.encoder, label="Feature encoder",
               description="DINOv2 model name, or an import path package.module:Class", view=encoders)
    props["encoder"] = inputs.str("encoder_checkpoint", default=None, label="Feature encoder checkpoint",
                                  description="Local weights file (optional; default: cache, downloaded once)")
    inputs.int("encoder_input_size", default=settings.encoder_input_size, min=14, label="Encoder input size",
               description="In pixels; blank: the encoder's own (518 for DINOv2); 224 is several times quicker on a CPU")
    _random_init_input(ctx, inputs)
    props["overrides"] = _preset_input(inputs, settings.preset)
    return props


def _preset_input(inputs, default: str | None):
    """The preset and the overrides; returns the overrides property."""
    inputs.enum("preset", list(PRESET_CHOICES), default=default or core.DEFAULT_PRESET, label="Settings preset",
                description="paper: the published method; fast: leaner SAM2 decoder, bf16 and merging on a 256 grid"
                            f" (presets: {', '.join(PRESET_CHOICES)})",
                view=types.RadioGroup())
    return inputs.str("overrides", default=None, label="Setting overrides",
                      description="e.g. proposal.points_per_side=16, merge.top_k=50 (a quick CPU run: "
                                  "proposal.points_per_side=8, proposal.image_size=512)")


def _invalid(prop, message: str) -> None:
    prop.invalid = True
    prop.error_message = message


def _check_models(make_spec, props: dict) -> core.RunSpec | None:
    """The run specification ``make_spec()`` builds, or None with the property at fault marked invalid: a bad
    setting override (its name in the message), a checkpoint file that does not exist, a missing checkpoint
    while offline."""
    try:
        spec = make_spec()
    except RunSpecError as exc:
        _invalid(props["overrides"], f"{exc} (fix or clear the setting overrides)")
        return None
    for role in ("proposer", "encoder"):
        problem = core.checkpoint_problem(spec, role)
        if problem and role in props:
            _invalid(props[role], problem)
            return None
    return spec


def _device_input(ctx, inputs):
    """The device field; returns the device it names, or None (the field marked invalid) if it is not usable here."""
    default = core.plugin_settings(ctx.dataset).get("device", core.DEFAULT_DEVICE)
    prop = inputs.str("device", default=default, label="Device", description="auto, cpu, cuda, cuda:1, mps")
    try:
        return core.resolve_device(ctx.params.get("device") or default, ctx.dataset)
    except ValueError as exc:
        _invalid(prop, str(exc))
        return None


def _from_app(ctx) -> bool:
    """A request of the App (its requests name the operator; ``execute_operator`` from Python does not), not a
    delegated job being run by a worker."""
    return "operator_uri" in ctx.request_params and not ctx.delegated


def _delegate_input(ctx, inputs, seconds: float | None = None, device=None) -> None:
    """The delegate switch, defaulting to what :meth:`_RefsegOperator.resolve_delegation` would choose, with the
    expected run time (``seconds``, None: unknown) and what delegating needs on this App server."""
    schedulable = core.can_schedule_delegated() or not _from_app(ctx)
    default = schedulable and seconds is not None and core.expected_too_long(seconds)
    prop = inputs.bool("delegate", default=default, label="Delegate execution?",
                       description="Run as a background job (needs a worker: `fiftyone delegated launch`)",
                       view=types.CheckboxView())
    timeout = core.operator_timeout()
    if seconds is not None:
        text = (f"Expected time: about {core.format_duration(seconds)} on {device or 'this device'} "
                f"(a run from the App is stopped after {timeout} s, FIFTYONE_OPERATOR_TIMEOUT)")
        too_long = core.expected_too_long(seconds)
        inputs.view("expected_time", (types.Warning if too_long else types.Notice)(label=text + (
            ": delegate it, or choose quicker settings" if too_long else "")))
    if not ctx.params.get("delegate", default):
        return
    if not schedulable:
        _invalid(prop, "this App server cannot queue background jobs: restart it with "
                       "FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS=true in its environment and start a worker "
                       "(`fiftyone delegated launch`), or untick 'Delegate execution'")
        return
    inputs.view("delegate_notice", types.Notice(
        label="Delegated: Execute queues the job; it runs when a worker picks it up (`fiftyone delegated launch`, "
              "`fiftyone delegated list` shows it). The refseg panel (+ > refseg) follows its progress and "
              "notifies you when it ends; otherwise the App tells you the next time this dataset is opened. "
              "For auto-label, 'Last run' in this form shows how it ended."))


def _model_settings(ctx, base: core.RunSpec) -> core.RunSpec:
    p = ctx.params
    return base.with_changes(proposer=p.get("proposer"), encoder=p.get("encoder"), preset=p.get("preset"),
                        overrides=p.get("overrides"), encoder_input_size=p.get("encoder_input_size"),
                        proposer_checkpoint=p.get("proposer_checkpoint"),
                        encoder_checkpoint=p.get("encoder_checkpoint"), random_init=p.get("random_init"))


def _progress_to_ctx(ctx):
    return lambda p: ctx.set_progress(progress=p.fraction, label=p[2])


def _reload_app(ctx):
    """The triggers that show new labels in the App: the grid and counts, then the sample views opened before."""
    yield ctx.trigger("reload_dataset")
    yield ctx.trigger(REFRESH_SAMPLE_VIEWS)


def _stream(ctx, generator, summarise, what: str = "the run", after_error: str = ""):
    """Generator execution for the App: progress bar updates, then a notification.

    FiftyOne's generator endpoint ends the response when the generator raises, without a word to the App or to
    the server log, so an error is caught here: printed with its traceback to the server's stderr and shown as
    an error notification that says what failed and what to do (``after_error``)."""
    try:
        while True:
            try:
                update = next(generator)
            except StopIteration as stop:
                report = stop.value
                break
            yield ctx.trigger("set_progress", {"progress": update.fraction, "label": update[2]})
    except Exception as exc:
        print(f"refseg: {what} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        yield ctx.ops.notify(f"refseg: {what} failed: {exc}. {after_error}".strip(), variant="error")
        yield from _reload_app(ctx)  # what was saved before the error
        return
    yield ctx.ops.notify(summarise(report), variant="success")
    yield from _reload_app(ctx)


async def _drain(generator, progress) -> dict:
    """:func:`core.exhaust` that gives control back to the event loop after every batch: a cancelled task
    (FiftyOne's delegated worker cancels it on Ctrl-C) stops there, the batch in flight finished and saved,
    and the labelling generator is closed (its run record then says ``interrupted``)."""
    try:
        while True:
            try:
                update = next(generator)
            except StopIteration as stop:
                return stop.value
            progress(update)
            await asyncio.sleep(0)
    finally:
        generator.close()


def _mark_interrupted(ctx) -> None:
    """Mark this delegated job failed (it was interrupted), so that it does not stay ``running`` and
    ``fiftyone delegated rerun <id>`` can resume it. Best effort: the interrupt propagates either way."""
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionResult

    doc_id = ctx.request_params.get("run_doc")
    if doc_id is None:
        return
    try:
        DelegatedOperationService().set_failed(doc_id=doc_id, result=ExecutionResult(error=(
            "interrupted (Ctrl-C or cancelled) after a finished batch; the samples labelled so far are saved: "
            f"`fiftyone delegated rerun {doc_id}` labels the rest")))
    except Exception as exc:  # the database may be what went away
        print(f"refseg: could not mark delegated operation {doc_id} failed ({exc}); run "
              f"`fiftyone delegated fail {doc_id}` and then `fiftyone delegated rerun {doc_id}`", flush=True)


def _notify(ctx, message: str):
    yield ctx.ops.notify(message, variant="success")


def _summary_output(ctx, label: str):
    outputs = types.Object()
    outputs.str("summary", label=label, view=types.MarkdownView())
    return types.Property(outputs)


def _call(operator, sample_collection, params: dict, delegate: bool):
    """Run ``operator`` from Python on ``sample_collection``; returns its report (or the queued job).

    Under a running event loop (a Jupyter notebook, Playwright's sync API) ``fo.execute_operator`` only
    schedules the run and returns an ``asyncio.Task`` that starts once the caller yields to the loop; the
    operator then runs to its end in a thread of its own (with its own loop), so the call blocks and returns
    the report as it does elsewhere.
    """
    params = {k: v for k, v in params.items() if v is not None}
    if isinstance(params.get("overrides"), dict):
        params["overrides"] = core.format_overrides(params["overrides"].items())
    params.update(scope="CURRENT_VIEW", delegate=bool(delegate), stream_progress=False)
    ctx = {"view": sample_collection.view()}
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        result = foo.execute_operator(operator.uri, ctx, params=params)
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="refseg-operator") as pool:
            result = pool.submit(foo.execute_operator, operator.uri, ctx, params=params).result()
    return result.result  # a failed run raised ExecutionError (in the thread, re-raised here)


class _RefsegOperator(foo.Operator):
    """Shared delegation rule: the ``delegate`` parameter if given, else delegate the runs expected to take over
    half the App's operator timeout (:meth:`_expected_seconds`), where delegated runs can be queued."""

    def resolve_delegation(self, ctx):
        delegate = ctx.params.get("delegate")
        if delegate is not None:
            return bool(delegate)
        return self._delegate_by_default(ctx)

    def _delegate_by_default(self, ctx) -> bool:
        if _from_app(ctx) and not core.can_schedule_delegated():
            return False
        seconds = self._expected_seconds(ctx)
        return seconds is not None and core.expected_too_long(seconds)

    def _expected_seconds(self, ctx) -> float | None:
        """Expected seconds of this run (None: quick, or not known because the form is not valid)."""
        return None

    @staticmethod
    def _estimate(ctx, make_spec, num_images: int, task: str, devices: list[str] | None = None) -> float | None:
        try:
            return core.expected_seconds(make_spec(), core.resolve_device(ctx.params.get("device"), ctx.dataset),
                                         num_images, task, devices)
        except (ValueError, KeyError):  # a bad setting or device: the form says so
            return None

    def resolve_output(self, ctx):
        return _summary_output(ctx, "Result")


# ---------------------------------------------------------------------------- operators


class BuildMemoryBank(_RefsegOperator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="build_memory_bank",
            label="refseg: build memory bank",
            description="Embed the annotated instances of the reference samples into a memory bank",
            dynamic=True,
            allow_delegated_execution=True,
        )

    def __call__(self, sample_collection, label_field, bank_name=core.DEFAULT_BANK,
                 reference_tag=core.DEFAULT_REFERENCE_TAG, classes=None, proposer=None, encoder=None, device=None,
                 preset=None, overrides=None, encoder_input_size=None, proposer_checkpoint=None,
                 encoder_checkpoint=None, random_init=None, batch_size=core.DEFAULT_BANK_BATCH_SIZE, delegate=False):
        """Build memory bank ``bank_name`` from the instances in ``label_field`` of the samples tagged ``reference_tag``.

        Returns the report (references used per class, skipped ones with the reason),
        or the queued job when ``delegate`` is True.
        """
        return _call(self, sample_collection, dict(
            label_field=label_field, bank_name=bank_name, reference_tag=reference_tag,
            classes=list(classes) if classes else None, proposer=proposer, encoder=encoder, device=device,
            preset=preset, overrides=overrides, encoder_input_size=encoder_input_size,
            proposer_checkpoint=proposer_checkpoint, encoder_checkpoint=encoder_checkpoint, random_init=random_init,
            batch_size=batch_size), delegate)

    def _expected_seconds(self, ctx):
        tag = ctx.params.get("reference_tag") or core.DEFAULT_REFERENCE_TAG
        return self._estimate(ctx, lambda: _model_settings(ctx, core.default_run_spec(ctx.dataset)),
                              len(_scope_view(ctx).match_tags(tag)), "bank")

    def resolve_input(self, ctx):
        inputs = types.Object()
        _scope_input(ctx, inputs, "Where to look for reference samples")
        tag_prop = inputs.str("reference_tag", default=core.DEFAULT_REFERENCE_TAG,
                              label="Reference tag", description="Samples with this tag provide the references")
        tag = ctx.params.get("reference_tag") or core.DEFAULT_REFERENCE_TAG
        refs = _scope_view(ctx).match_tags(tag)
        n_refs = len(refs)
        if n_refs == 0:
            tag_prop.invalid = True
            tag_prop.error_message = (f"no sample here is tagged {tag!r}: tag a few annotated samples {tag!r} "
                                      "(or name their tag) first")
        field = _field_input(ctx, inputs, "label_field", "Reference labels",
                             "Detections with instance masks (boxes alone are turned into masks by the proposal "
                             "model)", default=core.DEFAULT_LABEL_FIELD)
        if field and n_refs:
            present = [c for c in refs.distinct(f"{field}.detections.label") if c is not None]
            classes = types.AutocompleteView()
            for c in present:
                classes.add_choice(c, label=c)
            inputs.list("classes", types.String(), default=None, label="Classes",
                        description=f"Leave empty for all {len(present)} present: {', '.join(present[:20])}",
                        view=classes)
            inputs.view("ref_count", types.Notice(label=f"{n_refs} reference sample(s) tagged '{tag}'"))
        inputs.str("bank_name", default=core.DEFAULT_BANK, label="Bank name",
                   description="An existing bank of this name is replaced")
        props = _model_inputs(ctx, inputs)
        spec = _check_models(lambda: _model_settings(ctx, core.default_run_spec(ctx.dataset)), props)
        device = _device_input(ctx, inputs)
        inputs.int("batch_size", default=core.DEFAULT_BANK_BATCH_SIZE, min=1, label="Batch size")
        seconds = core.expected_seconds(spec, device, n_refs, "bank") if spec and device else None
        _delegate_input(ctx, inputs, seconds, device)
        return types.Property(inputs, view=types.View(label="refseg: build memory bank"))

    def execute(self, ctx):
        p = ctx.params
        models = _model_settings(ctx, core.default_run_spec(ctx.dataset))
        report = core.build_memory_bank(
            _scope_view(ctx), label_field=p.get("label_field"), bank_name=p.get("bank_name") or core.DEFAULT_BANK,
            reference_tag=p.get("reference_tag") or core.DEFAULT_REFERENCE_TAG, classes=p.get("classes") or None,
            models=models, device=p.get("device"), batch_size=int(p.get("batch_size") or core.DEFAULT_BANK_BATCH_SIZE))
        lines = [f"Bank **{report['bank']}** saved to `{report['path']}`", ""]
        lines += [f"- {r['class']}: {r['used']} reference(s)" + (f", {r['skipped']} skipped ({'; '.join(r['reasons'])})"
                                                                 if r["skipped"] else "") for r in report["classes"]]
        if report["missing_classes"]:
            lines.append(f"- no annotation on the reference samples: {', '.join(report['missing_classes'])}")
        report["summary"] = "\n".join(lines)
        return report


class AutoLabel(_RefsegOperator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="auto_label",
            label="refseg: auto-label",
            description="Segment every instance of the bank's classes in the target samples",
            dynamic=True,
            execute_as_generator=True,
            allow_delegated_execution=True,
        )

    def __call__(self, sample_collection, bank_name=core.DEFAULT_BANK, label_field=core.DEFAULT_OUTPUT_FIELD,
                 reference_tag=None, existing=core.DEFAULT_EXISTING, score_threshold=None, preset=None,
                 overrides=None, batch_size=core.DEFAULT_LABEL_BATCH_SIZE, device=None, cache_candidates=None,
                 num_shards=None, shard_index=None,
                 devices=None, class_thresholds=False, prompt_selection=False, delegate=False):
        """Label ``sample_collection`` (except the reference samples) into ``label_field`` with a bank.

        Returns the run report, or the queued job when ``delegate`` is True.

        ``num_shards`` > 1 with ``shard_index`` (0-based): label only that shard of the targets
        (:func:`core.shard_of`). ``num_shards`` > 1 without ``shard_index``: queue ``num_shards``
        delegated jobs, one per shard, for as many workers (``fiftyone delegated launch``), and
        return ``{"jobs": [their ids], ...}``. ``devices`` (``"all"``, ``"cuda:0,cuda:1"``): every
        listed local device at once, one worker process each. ``class_thresholds`` / ``prompt_selection``: the
        bank's class thresholds / prompt threshold, stored by calibrate_thresholds.
        """
        return _call(self, sample_collection, dict(
            bank_name=bank_name, label_field=label_field, reference_tag=reference_tag, existing=existing,
            score_threshold=score_threshold, preset=preset, overrides=overrides, batch_size=batch_size,
            device=device, cache_candidates=cache_candidates, num_shards=num_shards, shard_index=shard_index,
            devices=devices, class_thresholds=class_thresholds, prompt_selection=prompt_selection), delegate)

    def _targets(self, ctx):
        return core._targets(_scope_view(ctx), self._reference_tag(ctx))

    @staticmethod
    def _num_shards(ctx) -> int:
        return int(ctx.params.get("num_shards") or 1)

    def _queues_shards(self, ctx) -> bool:
        """Several shards and none chosen: this run only queues one delegated job per shard."""
        return self._num_shards(ctx) > 1 and ctx.params.get("shard_index") is None

    def resolve_delegation(self, ctx):
        if self._queues_shards(ctx):
            return False  # queueing is quick; the shard jobs themselves are delegated
        return super().resolve_delegation(ctx)

    def resolve_run_name(self, ctx):
        n = self._num_shards(ctx)
        name = f"refseg: auto-label {ctx.params.get('label_field') or core.DEFAULT_OUTPUT_FIELD}"
        if n > 1 and ctx.params.get("shard_index") is not None:
            name += f" (shard {int(ctx.params['shard_index']) + 1}/{n})"
        return name

    def _reference_tag(self, ctx):
        tag = ctx.params.get("reference_tag")
        if tag is None:
            banks = core.list_banks(ctx.dataset)
            tag = banks.get(ctx.params.get("bank_name") or core.DEFAULT_BANK, {}).get(
                "reference_tag", core.DEFAULT_REFERENCE_TAG)
        return tag

    def _spec(self, ctx) -> core.RunSpec:
        p = ctx.params
        overrides = core.parse_overrides(p.get("overrides"))
        if p.get("score_threshold") is not None:
            overrides += (("merge.score_threshold", float(p["score_threshold"])),)
        if p.get("class_thresholds"):
            overrides += (("merge.class_thresholds", True),)
        if p.get("prompt_selection"):
            overrides += (("proposal.prompt_similarity", "bank"),)
        return core.run_spec_for_labelling(ctx.dataset, p.get("bank_name") or core.DEFAULT_BANK, p.get("preset"),
                                           overrides)

    def _expected_seconds(self, ctx):
        return self._estimate(ctx, lambda: self._spec(ctx), len(self._targets(ctx)), "label",
                              core.parse_devices(ctx.params.get("devices") or None))

    def resolve_input(self, ctx):
        inputs = types.Object()
        bank = _bank_input(ctx, inputs)
        if bank is None:
            return types.Property(inputs, view=types.View(label="refseg: auto-label"))
        record = core.list_banks(ctx.dataset).get(bank, {})
        _scope_input(ctx, inputs, "Samples to label (those with the reference tag are left out)")
        inputs.str("reference_tag", default=record.get("reference_tag", core.DEFAULT_REFERENCE_TAG),
                   label="Reference tag", description="Samples with this tag are not labelled (empty: label them too)")
        inputs.str("label_field", default=core.DEFAULT_OUTPUT_FIELD, label="Output field")
        existing = types.RadioGroup()
        existing.add_choice("resume", label="Resume",
                            description="Skip samples this very run (same bank and settings) already labelled")
        existing.add_choice("skip_labelled", label="Skip labelled", description="Skip every sample with the field")
        existing.add_choice("overwrite", label="Overwrite", description="Label every sample again")
        inputs.enum("existing", existing.values(), default=core.DEFAULT_EXISTING, label="Existing labels",
                    view=existing)
        inputs.float("score_threshold", default=None, min=0.0, max=1.0, label="Score threshold",
                     description="Drop detections scoring below this (default: the preset's, 0)")
        if record.get("thresholds"):  # estimated by calibrate_thresholds
            inputs.bool("class_thresholds", default=False, label="Apply the class thresholds",
                        description="Drop detections below their class's threshold ("
                                    + class_thresholds_text(record["thresholds"]) + ")",
                        view=types.CheckboxView())
        prompt = recorded_prompt_threshold(record)
        if prompt is not None:  # chosen by calibrate_thresholds for the bank as it is
            inputs.bool("prompt_selection", default=False,
                        label=f"Skip prompts far from the bank (stored threshold {prompt['threshold']:.3f})",
                        description="Decode only the grid prompts whose image feature is this similar to a class "
                                    "of the bank or more: faster (the prompt decoder is most of the labelling "
                                    "time), but an object whose prompts all fall below it is missed, so recall "
                                    "drops a little. On the references: "
                                    + prompt_threshold_text(prompt),
                        view=types.CheckboxView())
        overrides = _preset_input(inputs, record.get("preset", core.DEFAULT_PRESET))
        spec = _check_models(lambda: self._spec(ctx), {"overrides": overrides})
        if spec is not None:
            problems = [p for p in (core.checkpoint_problem(spec, r) for r in ("proposer", "encoder")) if p]
            if problems:  # the bank's models
                _invalid(inputs.view("checkpoint_error", types.Error(label="The bank's models cannot be loaded",
                                                                      description=problems[0])),
                         problems[0])
            if spec.random_init:
                inputs.view("random_init_warning", types.Warning(label="This bank was built with random weights",
                                                                 description=RANDOM_WEIGHTS_WARNING))
        inputs.int("batch_size", default=core.DEFAULT_LABEL_BATCH_SIZE, min=1, label="Batch size")
        device = _device_input(ctx, inputs)
        devices_prop = inputs.str("devices", default=None, label="Several devices",
                                  description="Every listed local device at once, one process each: all (every "
                                              "GPU), or cuda:0,cuda:1 (empty: the single device above; batch size "
                                              "is then per device)")
        try:
            devices = core.parse_devices(ctx.params.get("devices") or None)
        except ValueError as exc:
            _invalid(devices_prop, str(exc))
            devices = None
        inputs.bool("cache_candidates", default=_cache_default(ctx), label="Cache proposals",
                    description="Keep each image's proposals and features on disk, so that labelling again after "
                                "a review (or with other merge settings) runs no network")
        n = len(self._targets(ctx))
        inputs.view("target_count", types.Notice(label=f"{n} sample(s) to consider"))
        _last_run_view(ctx, inputs)
        inputs.int("num_shards", default=1, min=1, label="Shards",
                   description="Split the targets into this many disjoint parts (by a hash of the sample id), "
                               "one delegated job each, for several workers or machines")
        n_shards = self._num_shards(ctx)
        if n_shards > 1:
            inputs.int("shard_index", default=None, min=0, max=n_shards - 1, label="Shard",
                       description=f"Only this shard (0..{n_shards - 1}); empty: queue one delegated job per shard")
        if self._queues_shards(ctx):
            inputs.view("shards_notice", types.Notice(
                label=f"{n_shards} delegated jobs will be queued, one per shard: start a worker per GPU or machine "
                      "(`fiftyone delegated launch`)"))
        else:
            seconds = core.expected_seconds(spec, device, n, "label", devices) if spec and device else None
            _delegate_input(ctx, inputs, seconds, ", ".join(devices) if devices else device)
        return types.Property(inputs, view=types.View(label="refseg: auto-label"))

    async def execute(self, ctx):
        # a coroutine: FiftyOne runs it on its event loop, not in a thread, so _drain can stop between batches
        p = ctx.params
        if self._queues_shards(ctx):
            report = self._queue_shards(ctx)
            if ctx.delegated or not p.get("stream_progress", True):
                return report
            return _notify(ctx, report["summary"])  # the App reads a generator operator's triggers
        generator = core.iter_auto_label(
            _scope_view(ctx), bank_name=p.get("bank_name") or core.DEFAULT_BANK,
            label_field=p.get("label_field") or core.DEFAULT_OUTPUT_FIELD, reference_tag=self._reference_tag(ctx),
            batch_size=int(p.get("batch_size") or core.DEFAULT_LABEL_BATCH_SIZE), device=p.get("device"),
            score_threshold=p.get("score_threshold"), preset=p.get("preset"), overrides=p.get("overrides"),
            existing=p.get("existing") or core.DEFAULT_EXISTING,
            cache_candidates=bool(p.get("cache_candidates", _cache_default(ctx))),
            num_shards=self._num_shards(ctx), shard_index=p.get("shard_index"), devices=p.get("devices") or None,
            class_thresholds=bool(p.get("class_thresholds")), prompt_selection=bool(p.get("prompt_selection")))
        if ctx.delegated or not p.get("stream_progress", True):
            try:
                report = await _drain(generator, _progress_to_ctx(ctx))
            except BaseException as exc:
                if ctx.delegated and not isinstance(exc, Exception):
                    _mark_interrupted(ctx)
                raise
            report["summary"] = _label_summary(report)
            return report
        return _stream(ctx, generator, _label_summary, "auto-label", (
            "Fix the cause and run auto-label again: the samples labelled so far are saved and are not labelled "
            "again (details in the App server's log)"))

    def _queue_shards(self, ctx) -> dict:
        """Queue one delegated auto_label job per shard, each with this run's context and its ``shard_index``."""
        n = self._num_shards(ctx)
        label_field = ctx.params.get("label_field") or core.DEFAULT_OUTPUT_FIELD
        # checked and declared once here, not by n jobs at the same time
        core.prepare_auto_label(_scope_view(ctx), bank_name=ctx.params.get("bank_name") or core.DEFAULT_BANK,
                                label_field=label_field)
        base = {k: v for k, v in ctx.request_params.items() if k not in ("run_doc", "results", "target", "params")}
        jobs = []
        for index in range(n):
            params = {**copy.deepcopy(ctx.params), "num_shards": n, "shard_index": index, "delegate": True}
            jobs.append(fiftyone_access.queue_delegated(self, {**copy.deepcopy(base), "params": params,
                                                               "delegated": True}))
        return {"jobs": jobs, "num_shards": n, "label_field": label_field,
                "summary": f"Queued {n} delegated auto-label jobs into '{label_field}', one per shard: start "
                           "`fiftyone delegated launch` on each worker (GPU or machine)"}


def _last_run_view(ctx, inputs) -> None:
    """The last run into the output field (``info["refseg_runs"]``): how a delegated job ended shows here."""
    field = ctx.params.get("label_field") or core.DEFAULT_OUTPUT_FIELD
    run = ((ctx.dataset.info or {}).get(core.RUNS_KEY) or {}).get(field)
    if not run:
        return
    status = run.get("status", "?")
    text = (f"Last run into '{field}': {status}"
            + (f" at {run['finished_at']}" if run.get("finished_at") else "")
            + f", {run.get('num_labelled', 0)} labelled, {run.get('num_failed', 0)} failed")
    if status == "completed":
        inputs.view("last_run", types.Notice(label=text))
    else:
        detail = run.get("error") or ("still running, or stopped without a word" if status == "running" else "")
        inputs.view("last_run", types.Warning(label=text, description=" ".join(
            x for x in (detail, run.get("resume") or "") if x)))


def _cache_default(ctx) -> bool:
    return bool(core.plugin_settings(ctx.dataset).get("cache_candidates", False))


def _label_summary(report: dict) -> str:
    text = (f"Labelled {report['num_labelled']} sample(s) into '{report['label_field']}' "
            f"({report['num_instances']} instances); {report['num_already_done']} already done")
    if report["num_foreign_skipped"]:
        text += f"; {report['num_foreign_skipped']} left alone (labels not written by refseg)"
    if report["num_failed"]:
        text += f"; {report['num_failed']} failed: " + "; ".join(f["error"] for f in report["failed"][:3])
    return text


class BoxesToMasks(_RefsegOperator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="boxes_to_masks",
            label="refseg: boxes to masks",
            description="Give box-only detections an instance mask from the proposal model's box prompt",
            dynamic=True,
            execute_as_generator=True,
            allow_delegated_execution=True,
        )

    def __call__(self, sample_collection, label_field, out_field=None, proposer=None, device=None, preset=None,
                 overrides=None, proposer_checkpoint=None, random_init=None, overwrite=False, delegate=False):
        """Add masks to the box-only detections of ``label_field`` (or of a copy, ``out_field``)."""
        return _call(self, sample_collection, dict(
            label_field=label_field, out_field=out_field, proposer=proposer, device=device, preset=preset,
            overrides=overrides, proposer_checkpoint=proposer_checkpoint, random_init=random_init,
            overwrite=overwrite), delegate)

    def _expected_seconds(self, ctx):
        field = ctx.params.get("label_field")
        if not field:
            return None
        return self._estimate(ctx, lambda: _model_settings(ctx, core.default_run_spec(ctx.dataset)),
                              len(_scope_view(ctx).exists(field)), "boxes")

    def resolve_input(self, ctx):
        inputs = types.Object()
        _scope_input(ctx, inputs, "Samples whose boxes get masks")
        field = _field_input(ctx, inputs, "label_field", "Box field", "Detections whose boxes get masks")
        inputs.str("out_field", default=None, label="Output field",
                   description="Write to a copy of the field (default: in place)")
        inputs.bool("overwrite", default=False, label="Replace existing masks too")
        settings = core.default_run_spec(ctx.dataset)
        props = _proposer_inputs(ctx, inputs, settings)
        _random_init_input(ctx, inputs)
        props["overrides"] = _preset_input(inputs, settings.preset)
        spec = _check_models(lambda: _model_settings(ctx, settings), props)
        device = _device_input(ctx, inputs)
        n = len(_scope_view(ctx).exists(field)) if field else 0
        seconds = core.expected_seconds(spec, device, n, "boxes") if spec and device else None
        _delegate_input(ctx, inputs, seconds, device)
        return types.Property(inputs, view=types.View(label="refseg: boxes to masks"))

    def execute(self, ctx):
        p = ctx.params
        models = _model_settings(ctx, core.default_run_spec(ctx.dataset))
        generator = core.iter_boxes_to_masks(_scope_view(ctx), label_field=p.get("label_field"),
                                             out_field=p.get("out_field") or None, models=models,
                                             device=p.get("device"), overwrite=bool(p.get("overwrite", False)))
        summarise = lambda r: (f"{r['num_masks']} mask(s) written to '{r['out_field']}'"  # noqa: E731
                               + (f", {r['num_empty']} box(es) without a mask" if r["num_empty"] else "")
                               + (f", {r['num_failed']} image(s) failed" if r["num_failed"] else ""))
        if ctx.delegated or not p.get("stream_progress", True):
            report = core.exhaust(generator, _progress_to_ctx(ctx))
            report["summary"] = summarise(report)
            return report
        return _stream(ctx, generator, summarise, "boxes to masks", (
            "Fix the cause and run it again (details in the App server's log)"))


class EvaluateAutoLabels(_RefsegOperator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="evaluate_auto_labels",
            label="refseg: evaluate auto-labels",
            description="COCO-style mask evaluation of the predictions against ground truth (FiftyOne's)",
            dynamic=True,
            allow_delegated_execution=True,
        )

    def __call__(self, sample_collection, gt_field, pred_field=core.DEFAULT_OUTPUT_FIELD,
                 eval_key=core.DEFAULT_EVAL_KEY, reference_tag=core.DEFAULT_REFERENCE_TAG, iou=core.DEFAULT_IOU,
                 use_masks=True, only_labelled=True,
                 delegate=False):
        """Evaluate ``pred_field`` against ``gt_field``; returns mAP and per-class AP."""
        return _call(self, sample_collection, dict(
            gt_field=gt_field, pred_field=pred_field, eval_key=eval_key, reference_tag=reference_tag, iou=iou,
            use_masks=use_masks, only_labelled=only_labelled), delegate)

    def resolve_input(self, ctx):
        inputs = types.Object()
        _scope_input(ctx, inputs, "Samples to evaluate (reference samples are left out)")
        _field_input(ctx, inputs, "pred_field", "Predictions", "Auto-labels", default=core.DEFAULT_OUTPUT_FIELD,
                     required=False)
        _field_input(ctx, inputs, "gt_field", "Ground truth", "Annotated instances", default=core.DEFAULT_LABEL_FIELD)
        inputs.str("eval_key", default=core.DEFAULT_EVAL_KEY, label="Evaluation key",
                   description="An earlier evaluation of this key is replaced")
        inputs.str("reference_tag", default=core.DEFAULT_REFERENCE_TAG, label="Reference tag",
                   description="Samples with this tag are left out (empty: keep them)")
        inputs.float("iou", default=core.DEFAULT_IOU, min=0.0, max=1.0, label="IoU threshold for matches")
        inputs.bool("use_masks", default=True, label="Match masks (not boxes)")
        inputs.bool("only_labelled", default=True, label="Only samples with predictions")
        _delegate_input(ctx, inputs)
        return types.Property(inputs, view=types.View(label="refseg: evaluate auto-labels"))

    def execute(self, ctx):
        p = ctx.params
        tag = p.get("reference_tag", core.DEFAULT_REFERENCE_TAG)
        report = core.evaluate_auto_labels(
            _scope_view(ctx), pred_field=p.get("pred_field") or core.DEFAULT_OUTPUT_FIELD,
            gt_field=p.get("gt_field"), eval_key=p.get("eval_key") or core.DEFAULT_EVAL_KEY, reference_tag=tag or None,
            iou=float(p.get("iou") or core.DEFAULT_IOU), use_masks=bool(p.get("use_masks", True)),
            only_labelled=bool(p.get("only_labelled", True)))
        report["summary"] = _evaluation_summary(report)
        return report


def _ap(value: float) -> str:
    return "n/a (no ground truth)" if value < 0 else f"{value:.3f}"


def _evaluation_summary(report: dict) -> str:
    """The evaluation dialog: COCO's mAP named as what it is (averaged over IoU 0.50:0.95, not at the form's
    threshold), AP50 next to it, and the threshold the TP/FP/FN counts were matched at."""
    lines = [f"**mAP@[.50:.95]** {_ap(report['mAP'])} · **AP50** {_ap(report['mAP50'])} on "
             f"{report['num_samples']} sample(s); eval key `{report['eval_key']}`", "",
             f"TP {report['tp']}, FP {report['fp']}, FN {report['fn']} at IoU {report['iou']:g} (the form's "
             "threshold; mAP@[.50:.95] averages IoU 0.50, 0.55, ..., 0.95 whatever it is)", "",
             "| class | AP@[.50:.95] | AP50 |", "|---|---|---|"]
    lines += [f"| {c['class']} | {_ap(c['AP'])} | {_ap(c['AP50'])} |" for c in report["classes"]]
    return "\n".join(lines)


class ExportCoco(_RefsegOperator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="export_coco",
            label="refseg: export COCO",
            description="Write the labels as a COCO instances file (lossless RLE masks or polygons)",
            dynamic=True,
            allow_delegated_execution=True,
        )

    def __call__(self, sample_collection, label_field, export_dir, mask_format=core.DEFAULT_MASK_FORMAT,
                 export_media=False,
                 classes=None, delegate=False):
        """Export ``label_field`` to ``<export_dir>/labels.json`` (images to ``<export_dir>/data/`` if asked)."""
        return _call(self, sample_collection, dict(
            label_field=label_field, export_dir=str(export_dir), mask_format=mask_format,
            export_media=export_media, classes=list(classes) if classes else None), delegate)

    def _delegate_by_default(self, ctx):
        return bool(ctx.params.get("export_media")) and len(_scope_view(ctx)) > 1000

    def resolve_input(self, ctx):
        inputs = types.Object()
        _scope_input(ctx, inputs, "Samples to export")
        _field_input(ctx, inputs, "label_field", "Labels", "Detections to export", default=core.DEFAULT_OUTPUT_FIELD)
        inputs.str("export_dir", required=True, label="Export directory",
                   description="labels.json is written here (and the images under data/ if asked)")
        formats = types.RadioGroup()
        formats.add_choice("rle", label="RLE", description="Lossless compressed RLE masks")
        formats.add_choice("polygons", label="Polygons",
                           description="FiftyOne's COCO exporter (2-pixel tolerance, holes lost)")
        inputs.enum("mask_format", formats.values(), default=core.DEFAULT_MASK_FORMAT, label="Mask format",
                    view=formats)
        inputs.bool("export_media", default=False, label="Copy the images",
                    description="Otherwise the JSON refers to the images by absolute path")
        inputs.list("classes", types.String(), default=None, label="Classes",
                    description="Categories, in order (default: every label present)")
        _delegate_input(ctx, inputs)
        return types.Property(inputs, view=types.View(label="refseg: export COCO"))

    def execute(self, ctx):
        p = ctx.params
        export_dir = p.get("export_dir")
        if isinstance(export_dir, dict):  # a file explorer's value
            export_dir = export_dir.get("absolute_path")
        report = core.export_coco(_scope_view(ctx), label_field=p.get("label_field"), export_dir=export_dir,
                                  mask_format=p.get("mask_format") or core.DEFAULT_MASK_FORMAT,
                                  export_media=bool(p.get("export_media", False)), classes=p.get("classes") or None)
        report["summary"] = (f"Wrote `{report['labels_path']}` ({report['mask_format']}, "
                             f"{report['num_images']} image(s))")
        return report


class UpdateMemoryBankFromReview(_RefsegOperator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="update_memory_bank_from_review",
            label="refseg: update memory bank from review",
            description="Rejected predictions become negative references of their class, accepted ones references",
            dynamic=True,
            allow_delegated_execution=True,
        )

    def __call__(self, sample_collection, bank_name=core.DEFAULT_BANK, pred_field=core.DEFAULT_OUTPUT_FIELD,
                 rejected_tag=core.DEFAULT_REJECTED_TAG, accepted_tag=core.DEFAULT_ACCEPTED_TAG, device=None,
                 use_corrected=False, delegate=False):
        """Add the tagged predictions of ``pred_field`` to bank ``bank_name`` (``use_corrected``: also the labels
        a person corrected or added, tagged by find_corrections); returns what was added."""
        return _call(self, sample_collection, dict(
            bank_name=bank_name, pred_field=pred_field, rejected_tag=rejected_tag, accepted_tag=accepted_tag,
            device=device, use_corrected=use_corrected), delegate)

    def resolve_input(self, ctx):
        inputs = types.Object()
        bank = _bank_input(ctx, inputs)
        if bank is None:
            return types.Property(inputs, view=types.View(label="refseg: update memory bank from review"))
        _scope_input(ctx, inputs, "Samples whose reviewed predictions are used")
        field = _field_input(ctx, inputs, "pred_field", "Predictions", "Reviewed auto-labels",
                             default=core.DEFAULT_OUTPUT_FIELD, required=False)
        inputs.str("rejected_tag", default=core.DEFAULT_REJECTED_TAG, label="Rejected tag",
                   description="Predictions with this label tag become negative references")
        inputs.str("accepted_tag", default=core.DEFAULT_ACCEPTED_TAG, label="Accepted tag",
                   description="Predictions with this label tag become references")
        inputs.bool("use_corrected", default=False, label="Corrected labels become references too",
                    description=f"Labels tagged '{review.DEFAULT_CORRECTED_TAG}' (edited or added by a person; run "
                                "'find corrections' first) are added as references with their mask and box",
                    view=types.CheckboxView())
        if field:
            _review_counts_view(ctx, inputs, field)
        _device_input(ctx, inputs)
        _delegate_input(ctx, inputs)
        return types.Property(inputs, view=types.View(label="refseg: update memory bank from review"))

    def execute(self, ctx):
        p = ctx.params
        report = core.update_memory_bank_from_review(
            _scope_view(ctx), bank_name=p.get("bank_name") or core.DEFAULT_BANK,
            pred_field=p.get("pred_field") or core.DEFAULT_OUTPUT_FIELD,
            rejected_tag=p.get("rejected_tag", core.DEFAULT_REJECTED_TAG),
            accepted_tag=p.get("accepted_tag", core.DEFAULT_ACCEPTED_TAG), device=p.get("device"),
            corrected_tag=review.DEFAULT_CORRECTED_TAG if p.get("use_corrected") else None)
        neg = ", ".join(f"{r['class']}: {r['count']}" for r in report["negatives_added"]) or "none"
        pos = ", ".join(f"{r['class']}: {r['count']}" for r in report["references_added"]) or "none"
        report["summary"] = (f"Bank **{report['bank']}**: negatives added ({neg}); references added ({pos}); "
                             f"{report['already_in_bank']} already in the bank. Run auto-label again to use them.")
        return report


def _review_counts_view(ctx, inputs, field: str) -> None:
    """How many labels of the scope carry each tag the run uses; a warning when none would be added."""
    counts = _scope_view(ctx).count_label_tags(label_fields=field)
    rejected = ctx.params.get("rejected_tag") or core.DEFAULT_REJECTED_TAG
    accepted = ctx.params.get("accepted_tag") or core.DEFAULT_ACCEPTED_TAG
    corrected = review.DEFAULT_CORRECTED_TAG
    use_corrected = bool(ctx.params.get("use_corrected"))
    n_rejected, n_accepted, n_corrected = (counts.get(t, 0) for t in (rejected, accepted, corrected))
    text = f"{n_rejected} {rejected}, {n_accepted} {accepted}, {n_corrected} {corrected}"
    if n_corrected and not use_corrected:
        text += " (left out: tick 'Corrected labels become references too')"
    if n_rejected or n_accepted or (n_corrected and use_corrected):
        inputs.view("review_counts", types.Notice(label=text))
    else:
        inputs.view("review_counts", types.Warning(label=text, description=(
            f"Nothing to add: tag predictions '{rejected}' or '{accepted}' in the App"
            + (", or tick the box above" if n_corrected else
               f", or run 'find corrections' to tag the labels a person edited '{corrected}'"))))


class CalibrateThresholds(_RefsegOperator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="calibrate_thresholds",
            label="refseg: calibrate thresholds",
            description="Per-class score thresholds that reach a target precision, and / or the threshold that "
                        "skips prompts far from the bank, estimated on the bank's references",
            dynamic=True,
            allow_delegated_execution=True,
        )

    def __call__(self, sample_collection, bank_name=core.DEFAULT_BANK, label_field=None, target_precision=0.9,
                 prompt_share=None, device=None, delegate=False):
        """Estimate and store with bank ``bank_name`` its class thresholds reaching ``target_precision`` and /
        or its prompt threshold keeping ``prompt_share`` of the detections (None: not that one, as in
        ``refseg calibrate --prompt-share``); returns the report."""
        return _call(self, sample_collection, dict(
            bank_name=bank_name, label_field=label_field, class_thresholds=target_precision is not None,
            target_precision=target_precision, prompt_threshold=prompt_share is not None, prompt_share=prompt_share,
            device=device), delegate)

    @staticmethod
    def _num_reference_samples(ctx, bank: str) -> int:
        """The samples with the bank's reference tag (the estimate's image count; references added from a review
        are on other samples and make the run a little longer)."""
        bank_record = core.list_banks(ctx.dataset).get(bank) or {}
        tag = bank_record.get("reference_tag") or core.DEFAULT_REFERENCE_TAG
        return len(ctx.dataset.match_tags(tag))

    def _expected_seconds(self, ctx, bank: str | None = None):
        bank = bank or ctx.params.get("bank_name") or core.DEFAULT_BANK
        if bank not in core.list_banks(ctx.dataset):
            return None
        # each estimate asked for labels the reference samples once
        estimates = int(bool(ctx.params.get("class_thresholds", True))) + int(bool(ctx.params.get("prompt_threshold")))
        return self._estimate(ctx, lambda: core.RunSpec.from_dict(core.bank_record(ctx.dataset, bank)["models"]),
                              self._num_reference_samples(ctx, bank) * estimates, "label")

    def resolve_input(self, ctx):
        inputs = types.Object()
        view = types.View(label="refseg: calibrate thresholds")
        bank = _bank_input(ctx, inputs)
        if bank is None:
            return types.Property(inputs, view=view)
        record = core.bank_record(ctx.dataset, bank)
        stored = [f"class thresholds ({class_thresholds_text(record['thresholds'])})"] if record.get("thresholds") \
            else []
        prompt = recorded_prompt_threshold(record)
        stored += [f"prompt threshold ({prompt_threshold_text(prompt)})"] if prompt is not None else []
        if stored:
            inputs.view("stored_notice", types.Notice(label="Stored with the bank now: " + "; ".join(stored)))
        classes = inputs.bool("class_thresholds", default=True, label="Class thresholds",
                              description="Per class, the lowest score threshold whose detections reach a target "
                                          "precision (auto-label's *Apply the class thresholds*)",
                              view=types.CheckboxView())
        if ctx.params.get("class_thresholds", True):
            _field_input(ctx, inputs, "label_field", "Annotations", "The reference samples' ground truth",
                         default=record.get("label_field"), required=False)
            inputs.float("target_precision", default=0.9, min=0.01, max=1.0, label="Target precision",
                         description="Each class gets the lowest score threshold whose detections reach this "
                                     "precision")
            inputs.view("calibrate_notice", types.Notice(label=(
                "Each reference sample is labelled with the bank minus its own references; every instance of the "
                "bank's classes on the reference samples must be annotated, or the estimates come out too low.")))
        inputs.bool("prompt_threshold", default=False, label="Prompt threshold",
                    description="The similarity to the bank below which auto-label can skip a grid prompt (its "
                                "*Skip prompts far from the bank*: faster, a little less recall), chosen to keep "
                                "a share of the detections on the references; needs a proposer with prompt "
                                "points (SAM2), no annotation",
                    view=types.CheckboxView())
        if ctx.params.get("prompt_threshold"):
            inputs.float("prompt_share", default=0.95, min=0.01, max=1.0, label="Share of detections to keep",
                         description="The highest threshold keeping at least this share of the references' "
                                     "leave-one-out detections (as refseg calibrate --prompt-share)")
        if not ctx.params.get("class_thresholds", True) and not ctx.params.get("prompt_threshold"):
            _invalid(classes, "choose what to estimate: the class thresholds, the prompt threshold or both")
        device = _device_input(ctx, inputs)
        _delegate_input(ctx, inputs, self._expected_seconds(ctx, bank) if device else None, device)
        return types.Property(inputs, view=view)

    def execute(self, ctx):
        p = ctx.params
        report = core.calibrate_thresholds(
            ctx.dataset, bank_name=p.get("bank_name") or core.DEFAULT_BANK, label_field=p.get("label_field"),
            target_precision=float(p.get("target_precision") or 0.9) if p.get("class_thresholds", True) else None,
            prompt_share=float(p.get("prompt_share") or 0.95) if p.get("prompt_threshold") else None,
            device=p.get("device"))
        how = ["*Apply the class thresholds*"] if "classes" in report else []
        if (report.get("prompt_threshold") or {}).get("threshold") is not None:
            how.append("*Skip prompts far from the bank*")
        report["summary"] = (f"Stored with the bank ({report['images']} reference image(s)):\n\n"
                             + "\n".join(f"- {line}" for line in report["lines"])
                             + (f"\n\nApply with auto-label's {' and '.join(how)} option." if how else ""))
        return report


class FindCorrections(_RefsegOperator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="find_corrections",
            label="refseg: find corrections",
            description="Tag 'corrected' the auto-labels a person edited (label, box, mask) or added",
            dynamic=True,
            allow_delegated_execution=True,
        )

    def __call__(self, sample_collection, label_field=core.DEFAULT_OUTPUT_FIELD,
                 corrected_tag=review.DEFAULT_CORRECTED_TAG, delegate=False):
        """Tag the edited or added detections of ``label_field``; returns the counts."""
        return _call(self, sample_collection, dict(label_field=label_field, corrected_tag=corrected_tag), delegate)

    def resolve_input(self, ctx):
        inputs = types.Object()
        _scope_input(ctx, inputs, "Samples whose labels are checked")
        _field_input(ctx, inputs, "label_field", "Labels", "Auto-labels reviewed in the App",
                     default=core.DEFAULT_OUTPUT_FIELD, required=False)
        inputs.str("corrected_tag", default=review.DEFAULT_CORRECTED_TAG, label="Corrected tag")
        _delegate_input(ctx, inputs)
        return types.Property(inputs, view=types.View(label="refseg: find corrections"))

    def execute(self, ctx):
        p = ctx.params
        report = review.find_corrections(_scope_view(ctx), p.get("label_field") or core.DEFAULT_OUTPUT_FIELD,
                                         p.get("corrected_tag") or review.DEFAULT_CORRECTED_TAG)
        report["summary"] = (f"{report['num_edited']} edited and {report['num_added']} added label(s) tagged "
                             f"**{report['tag']}** ({report['num_already']} tagged before)")
        return report


class RemaskBoxes(_RefsegOperator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="remask_boxes",
            label="refseg: new masks for corrected boxes",
            description="A new mask from the proposal model's box prompt for corrected or selected labels",
            dynamic=True,
            allow_delegated_execution=True,
        )

    def __call__(self, sample_collection, label_field=core.DEFAULT_OUTPUT_FIELD, only="corrected", label_ids=None,
                 bank_name=core.DEFAULT_BANK, device=None, delegate=False):
        """Remask the corrected (or, ``only="selected"``, the ``label_ids``) detections of ``label_field``."""
        return _call(self, sample_collection, dict(label_field=label_field, only=only, label_ids=label_ids,
                                                   bank_name=bank_name, device=device), delegate)

    def resolve_input(self, ctx):
        inputs = types.Object()
        _scope_input(ctx, inputs, "Samples whose labels get new masks")
        _field_input(ctx, inputs, "label_field", "Labels", "Detections whose boxes are prompted",
                     default=core.DEFAULT_OUTPUT_FIELD, required=False)
        choices = types.RadioGroup()
        choices.add_choice("corrected", label="Corrected boxes (drawn as a box, mask removed, or box moved)",
                           description="A mask a person painted or drew is kept")
        choices.add_choice("selected", label=f"Selected labels ({len(ctx.selected_labels or [])})",
                           description="Their masks are replaced, painted ones too")
        inputs.enum("only", choices.values(), default="selected" if ctx.selected_labels else "corrected",
                    label="Labels", view=choices)
        _bank_input(ctx, inputs)
        _device_input(ctx, inputs)
        _delegate_input(ctx, inputs)
        return types.Property(inputs, view=types.View(label="refseg: new masks for corrected boxes"))

    def execute(self, ctx):
        p = ctx.params
        label_ids = p.get("label_ids")
        if label_ids is None and p.get("only") == "selected":
            label_ids = [s["label_id"] for s in (ctx.selected_labels or [])]
        report = review.remask_boxes(_scope_view(ctx), label_field=p.get("label_field") or core.DEFAULT_OUTPUT_FIELD,
                                     only=p.get("only") or "corrected", label_ids=label_ids,
                                     bank_name=p.get("bank_name") or None, device=p.get("device"))
        report["summary"] = (f"{report['num_masks']} new mask(s)"
                             + (f", {report['num_empty']} box(es) without a mask" if report["num_empty"] else "")
                             + (f"; {report['num_kept']} corrected label(s) kept their own mask (select them and "
                                "choose 'Selected labels' to replace it)" if report.get("num_kept") else ""))
        return report


class AnnounceEndedJobs(foo.Operator):
    """Run by the App whenever a dataset is opened: a notification for each of this plugin's delegated jobs on
    it that ended (completed or failed) since it was last announced. (The refseg panel announces them as they
    end while it is open.)"""

    @property
    def config(self):
        return foo.OperatorConfig(name="announce_ended_jobs", label="refseg: announce ended jobs", unlisted=True,
                                  on_dataset_open=True)

    def execute(self, ctx):
        return {"announced": announce_ended_jobs(ctx) if ctx.dataset is not None else 0}


OPERATORS = (BuildMemoryBank, AutoLabel, BoxesToMasks, EvaluateAutoLabels, ExportCoco, UpdateMemoryBankFromReview,
             CalibrateThresholds, FindCorrections, RemaskBoxes, AnnounceEndedJobs)


def register(p):
    """Plugin entry point."""
    for operator in OPERATORS:
        p.register(operator)
    p.register(RefsegPanel)
