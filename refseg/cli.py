"""The ``refseg`` command line: sample references, build a bank, predict, evaluate, render.

Every subcommand only translates arguments into calls of the Python API
(:mod:`refseg.io.coco`, :class:`refseg.ReferenceEncoder`, :class:`refseg.Segmenter`,
:mod:`refseg.runtime.predict_job`, :mod:`refseg.io.visualize`). User errors (missing files,
unknown classes, a bank built for other features...) end with exit code 2 and a
one-line message; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

from . import __version__

from refseg.models.registry import DEFAULT_ENCODER, DEFAULT_PROPOSER


# Exit statuses (documented in README.md, "Exit status").
EXIT_OK = 0            # finished, everything done
EXIT_CRASH = 1         # unexpected error (a bug, a crash): Python's default
EXIT_USAGE = 2         # user error: bad arguments or input, reported in one line; nothing (more) done
EXIT_INCOMPLETE = 3    # finished, but some images failed (predict) or a class got no usable reference (build-bank)


class UsageError(Exception):
    """A problem with the user's input: reported in one line, exit code 2."""


# ---------------------------------------------------------------------------- helpers


def _say(*parts) -> None:
    print(*parts, flush=True)


def _warn(message: str) -> None:
    print(f"refseg: warning: {message}", file=sys.stderr, flush=True)


def _need_file(path: str | None, what: str) -> Path:
    if path is None:
        raise UsageError(f"{what} is required")
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} not found: {p}")
    return p


def _need_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{what} not found (or not a folder): {p}")
    return p


def _run_spec(args, **changes):
    """The run specification of the command's arguments: models, checkpoints, ``--preset``, ``--set``
    (``changes`` replace fields, e.g. the encoder a bank was built with)."""
    from refseg.runtime.run_spec import RunSpec, RunSpecError

    try:
        return RunSpec(
            proposer=getattr(args, "proposer", DEFAULT_PROPOSER), encoder=getattr(args, "encoder", None) or DEFAULT_ENCODER,
            preset=args.preset, encoder_input_size=getattr(args, "input_size", None),
            overrides=[*(args.set or ()), *(["merge.class_thresholds=true"] if getattr(args, "class_thresholds", False)
                                            else [])],
            proposer_checkpoint=args.proposer_checkpoint, encoder_checkpoint=args.encoder_checkpoint,
            random_init=args.random_weights, cache_dir=args.cache_dir, offline=args.offline or None,
        ).with_changes(**changes)
    except RunSpecError as exc:
        message = str(exc).replace("bad setting override: ", "bad --set: ")
        raise UsageError(message) from None


def _random_weights_banner() -> None:
    bar = "!" * 78
    print(f"{bar}\n!! --random-weights: the networks are RANDOMLY INITIALISED (fixed seed). The results are\n"
          f"!! meaningless; this only tries the flow without checkpoints.\n{bar}", file=sys.stderr, flush=True)


def _build(kind: str, spec, args):
    """Build the proposer or encoder of ``spec``; import/registry problems become usage errors."""
    build = spec.build_proposer if kind == "proposer" else spec.build_encoder
    try:
        return build(args.device)
    except (ImportError, AttributeError, TypeError, KeyError) as exc:
        name = spec.proposer if kind == "proposer" else spec.encoder
        raise UsageError(f"cannot build {kind} {name!r}: {exc.args[0] if exc.args else exc}") from None


def _write_json(path: Path, data) -> None:
    from refseg.io.files import write_json_atomic

    write_json_atomic(path, data, indent=1)


# ---------------------------------------------------------------------------- sample


def cmd_sample(args) -> int:
    from refseg.io.coco import category_names, sample_few_shot

    coco_path = _need_file(args.coco, "COCO file")
    refs = sample_few_shot(coco_path, args.shots, seed=args.seed, categories=args.classes, min_size=args.min_size,
                           border=args.border, allow_fewer=args.allow_fewer)
    out = Path(args.out)
    _write_json(out, refs)
    names = category_names(refs)
    counts: dict[int, int] = {cid: 0 for cid in names}
    for ann in refs["annotations"]:
        counts[int(ann["category_id"])] = counts.get(int(ann["category_id"]), 0) + 1
    for cid, n in counts.items():
        _say(f"  {names.get(cid, cid)}: {n} reference(s)")
    _say(f"{len(refs['annotations'])} references of {len(counts)} class(es) on {len(refs['images'])} image(s) "
         f"(seed {args.seed}) written to {out}")
    return 0


# ---------------------------------------------------------------------------- build-bank


def cmd_build_bank(args) -> int:
    from refseg.io.coco import box_prompts, category_names, iter_references, read_coco, resolve_classes
    from refseg.method.memory_bank import BankError, MemoryBank
    from refseg.method.references import NO_ANNOTATION, BankBuilder, ReferenceEncoder

    refs_path = _need_file(args.references, "reference file")
    image_dir = _need_dir(args.images, "image folder")
    if args.add_to:
        _need_file(args.add_to, "bank to add to")
    spec = _run_spec(args)
    cfg = spec.config()
    data = read_coco(refs_path)
    wanted = resolve_classes(args.classes, data)
    annotations = [a for a in data["annotations"] if wanted is None or int(a["category_id"]) in wanted]
    if not annotations:
        raise UsageError(f"{refs_path} holds no annotation" + (" of the selected classes" if wanted else ""))
    names = category_names(data)
    # every selected category (all of the file's by default), annotated or not, then any id only annotations use
    category_ids = list(dict.fromkeys([*(wanted if wanted is not None else names),
                                       *(int(a["category_id"]) for a in annotations)]))

    if args.random_weights:
        _random_weights_banner()
    encoder = _build("encoder", spec, args)
    if args.add_to:
        bank = MemoryBank.load(args.add_to, encoder.settings())
        _say(f"adding to {args.add_to}: {bank}")
    else:
        bank = MemoryBank(encoder.settings())

    def load_proposer():
        """Built on the first box-only reference whose box can prompt a mask (none: never loaded)."""
        _say(f"{len(box_prompts(data, wanted))} box-only reference(s): loading {args.proposer} to turn boxes into "
             "masks")
        return _build("proposer", spec, args)

    ref_encoder = ReferenceEncoder(encoder, cfg.reference, None, cfg.proposal.image_size, cfg.precision,
                                   proposer_factory=load_proposer)
    builder = BankBuilder(ref_encoder, bank, classes=[names.get(c, str(c)) for c in category_ids],
                          batch_size=args.batch_size)  # REFERENCE_CHUNK references decoded at a time
    t0 = time.perf_counter()
    builder.add_all(iter_references(data, image_dir, builder.report.skipped, categories=wanted),
                    negative=args.negative)
    bank, report = builder.finish()

    kind = "negative" if args.negative else "positive"
    _say(f"{kind} references per class ({time.perf_counter() - t0:.1f}s):")
    for row in report.rows():
        if not (row["used"] or row["negatives"] or row["skipped"]):
            _say(f"  {row['class']}: 0 used ({NO_ANNOTATION})")
            continue
        _say(f"  {row['class']}: {report.added(row['class'])} used"
             + (f", {row['skipped']} skipped" if row["skipped"] else ""))
    for source, c, reason in report.skipped:
        _say(f"  skipped {c} (image {source.get('image')!r}, annotation {source.get('annotation_id')}): {reason}")
    unusable = [c for c in report.all_classes() if not report.added(c)]
    if not any(map(report.added, report.all_classes())):
        raise BankError("no usable reference: nothing was added to the bank (see the reasons above)")
    unannotated = report.unannotated()
    if unannotated:
        _warn(f"{len(unannotated)} selected class(es) have no annotation in {refs_path}: {', '.join(unannotated)}; "
              "annotate some, or leave them out with --classes")
    if unusable:
        _warn(f"no usable reference for {len(unusable)} class(es): {', '.join(unusable)}; "
              f"{'they are not in the bank' if not args.add_to else 'they got nothing new'}")
    bank.check_usable()
    out = bank.save(args.out)
    _say(f"memory bank written to {out}: {bank}")
    missing = [c for c in unusable if c not in bank.class_names]
    if missing:
        _warn(f"incomplete bank (exit status {EXIT_INCOMPLETE}): no usable reference for "
              f"{len(missing)} class(es): {', '.join(missing)}")
        return EXIT_INCOMPLETE
    return EXIT_OK


# ---------------------------------------------------------------------------- predict


def _category_ids(class_names: list[str], coco: dict | None) -> tuple[dict[str, int], list[dict]]:
    """Bank class -> COCO category id (by name from ``coco``, else 1..C in bank order), and the category list."""
    if coco is None or not coco.get("categories"):  # no categories to match: ids 1..C in bank order
        mapping = {c: i + 1 for i, c in enumerate(class_names)}
        return mapping, [{"id": i, "name": c} for c, i in mapping.items()]
    by_name = {str(c["name"]): int(c["id"]) for c in coco.get("categories", [])}
    by_lower = {n.lower(): i for n, i in by_name.items()}
    mapping: dict[str, int] = {}
    unmatched = []
    for c in class_names:
        cid = by_name.get(c, by_lower.get(c.lower()))
        if cid is None:
            unmatched.append(c)
        else:
            mapping[c] = cid
    if not mapping:
        raise UsageError(f"no bank class matches a category of the targets' COCO file by name "
                         f"(bank: {', '.join(class_names)}; file: {', '.join(list(by_name)[:20])})")
    next_id = max([*by_name.values(), 0]) + 1
    for c in unmatched:
        mapping[c] = next_id
        next_id += 1
    if unmatched:
        _warn(f"bank class(es) not among the targets' categories: {', '.join(unmatched)}; "
              f"they get new ids {', '.join(str(mapping[c]) for c in unmatched)}")
    return mapping, [{"id": i, "name": c} for c, i in mapping.items()]


def _bank_run_spec(args, spec, bank):
    """``spec`` with the encoder the bank was built with (``--encoder`` when given) and its input size."""
    encoder_name = args.encoder
    if encoder_name is None:
        from refseg.models.registry import is_registered_encoder

        encoder_name = str(bank.encoder_settings.get("name", ""))
        if not is_registered_encoder(encoder_name):
            raise UsageError(f"the bank was built with encoder {encoder_name!r}, which is not a registered model "
                             f"name: pass it with --encoder (e.g. --encoder package.module:Class)")
    return spec.with_changes(encoder=encoder_name, encoder_input_size=bank.encoder_settings.get("input_size"))


def _single_device_segmenter(args, spec, bank):
    """The Segmenter of ``spec`` with ``bank`` on ``--device`` (the bank is checked against the encoder first)."""
    encoder = _build("encoder", spec, args)
    bank.check_encoder(encoder.settings())
    return spec.build_segmenter(bank, proposer=_build("proposer", spec, args), encoder=encoder)


def cmd_predict(args) -> int:
    from refseg.runtime.predict_job import lock_output

    if Path(args.out).parent.is_dir():
        # a second run on the same --out is refused at start (exit status 2), before any work
        with lock_output(args.out):
            return _cmd_predict(args)
    return _cmd_predict(args)


def _cmd_predict(args) -> int:
    from refseg.io.coco import read_coco, target_images
    from refseg.method.memory_bank import MemoryBank
    from refseg.runtime.device_pool import DevicePool, local_devices
    from refseg.runtime.predict_job import list_images, run_prediction, sidecar_path

    bank_path = _need_file(args.bank, "memory bank")
    image_dir = _need_dir(args.images, "image folder")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {args.limit})")
    coco = read_coco(_need_file(args.coco, "targets' COCO file"), require_file_names=True) if args.coco else None
    spec = _run_spec(args)  # settings are checked before anything is read
    bank = MemoryBank.load(bank_path)
    bank.check_usable()

    if coco is not None:
        targets = target_images(coco)
    else:
        targets = list_images(image_dir)
    if args.limit is not None:
        targets = targets[:args.limit]
    if not targets:
        raise UsageError(f"no target image: {'the COCO file lists none' if coco else f'no image file in {image_dir}'}")
    mapping, categories = _category_ids(bank.class_names, coco)

    spec = _bank_run_spec(args, spec, bank)
    cfg = spec.config()
    if args.random_weights:
        _random_weights_banner()
    devices = local_devices(args.devices) if args.devices else []
    batch_size = args.batch_size
    if len(devices) > 1:
        _say(f"starting {len(devices)} workers: {', '.join(devices)}")
        segmenter = DevicePool(spec, bank_path, devices, candidate_dir=args.candidate_cache)
        batch_size *= len(devices)
    else:
        if devices:
            args.device = devices[0]
        segmenter = _single_device_segmenter(args, spec, bank)

    cache = None
    if args.candidate_cache and isinstance(segmenter, DevicePool):
        cache = segmenter.cache
    elif args.candidate_cache:
        from refseg.runtime.candidate_cache import CandidateCache

        cache = CandidateCache.for_segmenter(args.candidate_cache, segmenter)
    if cache is not None:
        _say(f"candidate cache: {cache.root} ({len(cache)} image(s) in it)")

    out = Path(args.out)
    _write_json(sidecar_path(out, ".categories.json"), categories)
    _write_json(sidecar_path(out, ".images.json"), [{"id": i, "file_name": f} for i, f in targets])
    _say(f"labelling {len(targets)} image(s) with {len(bank.class_names)} class(es) "
         f"({cfg.name} settings, batch {args.batch_size})")
    try:
        run = run_prediction(segmenter, targets, out, mapping, image_root=image_dir, batch_size=batch_size,
                             keep_partial=not args.remove_partial, restart=args.restart,
                             progress=False if args.quiet else None, cache=cache)
    finally:
        if isinstance(segmenter, DevicePool):
            segmenter.close()
    _say(run.summary())
    if cache is not None:
        _say(f"candidate cache: {cache.stats['hits']} image(s) read from it, {cache.stats['writes']} written")
    _say(f"category ids: {sidecar_path(out, '.categories.json')}")
    if run.failed:
        _warn(f"finished, but {len(run.failed)} of {run.n_images} image(s) failed (listed above; exit status "
              f"{EXIT_INCOMPLETE}); rerun the command to retry them")
        return EXIT_INCOMPLETE
    return EXIT_OK


# ---------------------------------------------------------------------------- calibrate


def _held_out_images(bank, gt: dict, image_dir: Path, skipped: list[str]):
    """One :class:`~refseg.method.thresholds.HeldOutImage` per reference image of the bank: its bank entries, and
    as ground truth every annotation of that image in ``gt`` of a bank class (a box-only one as its box)."""
    import numpy as np

    from refseg.io.coco import annotation_mask, category_names
    from refseg.method.thresholds import HeldOutImage

    by_file: dict[str, list[str]] = {}
    for entry in bank.entries:
        if entry.negative:
            continue
        if not entry.source.get("image"):
            skipped.append(f"reference {entry.id} ({entry.class_name}) names no image file: it cannot be held out")
            continue
        by_file.setdefault(str(entry.source["image"]), []).append(entry.id)
    images = {str(im.get("file_name")): im for im in gt["images"]}
    names = category_names(gt)
    classes = set(bank.class_names)
    for file_name, ids in by_file.items():
        info = images.get(file_name)
        if info is None:
            skipped.append(f"{file_name}: not in the ground-truth COCO file")
            continue
        h, w = int(info["height"]), int(info["width"])
        masks, labels = [], []
        for ann in gt["annotations"]:
            name = names.get(int(ann["category_id"]))
            if int(ann["image_id"]) != int(info["id"]) or name not in classes or ann.get("iscrowd"):
                continue
            mask = annotation_mask(ann.get("segmentation"), h, w) if ann.get("segmentation") else None
            if mask is None:  # box only: the box as its mask
                x, y, bw, bh = (float(v) for v in ann["bbox"])
                mask = np.zeros((h, w), dtype=bool)
                mask[int(round(y)):int(round(y + bh)), int(round(x)):int(round(x + bw))] = True
            masks.append(mask)
            labels.append(name)
        yield HeldOutImage(image_dir / file_name, ids, np.array(masks, dtype=bool).reshape(len(masks), h, w), labels,
                           name=file_name)


def cmd_calibrate(args) -> int:
    from refseg.io.coco import read_coco
    from refseg.method.calibration import calibrate_bank
    from refseg.method.memory_bank import MemoryBank
    from refseg.method.thresholds import NO_DATA, UNREACHABLE

    bank_path = _need_file(args.bank, "memory bank")
    image_dir = _need_dir(args.images, "image folder")
    gt = read_coco(_need_file(args.ground_truth, "ground-truth COCO file"))
    if not 0 < args.target_precision <= 1:
        raise UsageError(f"--target-precision must be in (0, 1], got {args.target_precision}")
    if args.prompt_share is not None and not 0 < args.prompt_share <= 1:
        raise UsageError(f"--prompt-share must be in (0, 1], got {args.prompt_share}")
    spec = _run_spec(args)
    bank = MemoryBank.load(bank_path)
    bank.check_usable()
    # estimated with the run's settings, never with thresholds already stored
    spec = _bank_run_spec(args, spec, bank).with_changes(overrides=(*spec.overrides, ("merge.class_thresholds", False)))
    if args.random_weights:
        _random_weights_banner()
    segmenter = _single_device_segmenter(args, spec, bank)
    skipped: list[str] = []
    held_out = list(_held_out_images(bank, gt, image_dir, skipped))
    for line in skipped:
        _warn(line)
    if not held_out:
        raise UsageError(f"none of the bank's reference images is in {args.ground_truth}: nothing to estimate from")
    _say(f"labelling {len(held_out)} reference image(s), each with the bank minus its own references "
         f"(target precision {args.target_precision}); the images' instances of the bank's classes must all be "
         "annotated in the ground truth, else the estimates are too low")
    calibration = calibrate_bank(segmenter, held_out, args.target_precision, args.prompt_share)
    for name, reason in calibration.failed:
        _warn(f"{name}: {reason}")
    for line in calibration.lines():
        _say(f"  {line}")
    report = calibration.thresholds
    out = Path(args.out or bank_path)
    bank.save(out)
    _say(f"class thresholds stored in {out}; apply them with refseg predict --class-thresholds"
         + ("; the prompt threshold with --set proposal.prompt_similarity=bank" if args.prompt_share else ""))
    unsure = [c for c, t in report.classes.items() if t.status in (NO_DATA, UNREACHABLE)]
    return EXIT_INCOMPLETE if unsure or report.failed else EXIT_OK


# ---------------------------------------------------------------------------- evaluate


def cmd_evaluate(args) -> int:
    from refseg.io.coco import evaluate

    gt = _need_file(args.gt, "ground-truth file")
    results = _need_file(args.results, "results file")
    iou_types = [t.strip() for t in args.iou_types.split(",") if t.strip()]
    bad = [t for t in iou_types if t not in ("bbox", "segm")]
    if bad or not iou_types:
        raise UsageError(f"--iou-types takes bbox and/or segm, got {args.iou_types!r}")
    stats = evaluate(gt, results, iou_types=iou_types, classes=args.classes)
    _say("")
    for t, s in stats.items():
        _say(f"{t}: AP {100 * s['AP']:.1f}  AP50 {100 * s['AP50']:.1f}  AP75 {100 * s['AP75']:.1f}")
    if args.json_out:
        _write_json(Path(args.json_out), stats)
        _say(f"statistics written to {args.json_out}")
    return 0


# ---------------------------------------------------------------------------- render


def cmd_render(args) -> int:
    from refseg.io.coco import category_names, read_coco, read_results, target_images
    from refseg.runtime.predict_job import sidecar_path
    from refseg.io.visualize import render_coco_results

    image_dir = _need_dir(args.images, "image folder")
    results_path = _need_file(args.results, "results file")
    results = read_results(results_path)
    if args.gt:
        gt = read_coco(_need_file(args.gt, "COCO file"), require_file_names=True)
        images = dict(target_images(gt))
        names = category_names(gt)
    else:
        images_file = sidecar_path(results_path, ".images.json")
        if not images_file.is_file():
            raise UsageError(f"no file names for the image ids: pass --gt (the COCO file of the images) or keep "
                             f"{images_file} written by 'refseg predict'")
        images = {int(d["id"]): str(d["file_name"]) for d in json.loads(images_file.read_text())}
        names = {}
    cats_file = sidecar_path(results_path, ".categories.json")
    if cats_file.is_file():
        names = {**{int(c["id"]): str(c["name"]) for c in json.loads(cats_file.read_text())}, **names}
    written = render_coco_results(results, image_dir, args.out, images, names, max_images=args.max_images,
                                  score_threshold=args.score_threshold, max_detections=args.max_detections)
    if not written:
        _warn(f"nothing rendered: no detection scored at least {args.score_threshold} on a readable image")
    else:
        _say(f"{len(written)} picture(s) written to {args.out}")
    return 0


# ---------------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    from refseg.testing import make_synthetic_coco

    out = Path(args.out)
    t0 = time.perf_counter()
    train_images, train_json = make_synthetic_coco(out / "train", n_images=8, seed=1)
    val_images, val_json = make_synthetic_coco(out / "val", n_images=6, seed=2)
    _say(f"synthetic data: {train_json} (references), {val_json} (targets)")
    toy = ["--encoder", "refseg.testing:ColorEncoder", "--device", "cpu", "--set", "proposal.image_size=256"]
    steps = [
        ["sample", "--coco", str(train_json), "--shots", str(args.shots), "--seed", "33", "--allow-fewer",
         "--out", str(out / "refs.json")],
        ["build-bank", "--references", str(out / "refs.json"), "--images", str(train_images),
         "--out", str(out / "bank.safetensors"), "--proposer", "refseg.testing:ColorRegionProposer", *toy],
        ["predict", "--bank", str(out / "bank.safetensors"), "--coco", str(val_json), "--images", str(val_images),
         "--out", str(out / "results.json"), "--proposer", "refseg.testing:ColorRegionProposer", "--restart",
         "--quiet", *toy],
        ["evaluate", "--gt", str(val_json), "--results", str(out / "results.json"),
         "--json-out", str(out / "metrics.json")],
        ["render", "--images", str(val_images), "--results", str(out / "results.json"), "--gt", str(val_json),
         "--out", str(out / "renders"), "--max-images", "3", "--score-threshold", "0.5"],
    ]
    for step in steps:
        _say(f"\n$ refseg {' '.join(step)}")
        rc = main(step + (["--debug"] if args.debug else []))
        if rc:
            return rc
    _say(f"\ndemo finished in {time.perf_counter() - t0:.1f}s; everything is in {out}:")
    for name in ("refs.json", "bank.safetensors", "results.json", "metrics.json", "renders"):
        _say(f"  {out / name}")
    return 0


# ---------------------------------------------------------------------------- models


def cmd_models(args) -> int:
    from refseg.models.checkpoints import cache_dir
    from refseg.models.dinov2_encoder import DINOV2_VARIANTS
    from refseg.models.sam2_proposer import SAM2_VARIANTS
    from refseg.models.timm_encoder import TIMM_VARIANTS, cached_source

    root = cache_dir(args.cache_dir)
    _say(f"checkpoint cache: {root} (--cache-dir or $REFSEG_CACHE_DIR)")
    rows = [("proposer", name, (root / v.checkpoint.filename).is_file(), v.checkpoint.url)
            for name, v in SAM2_VARIANTS.items()]
    rows += [("encoder", name, (root / v.checkpoint.filename).is_file(), v.checkpoint.url)
             for name, v in DINOV2_VARIANTS.items()]
    for name, v in TIMM_VARIANTS.items():  # present: a file of any source; the URL is that source's, else timm's
        found = cached_source(v, root)
        source = found[0] if found else v.sources[0]
        rows.append(("encoder", name, found is not None, f"{source.spec.url} ({source.label})"))
    width = max(len(name) for _, name, _, _ in rows)
    for kind, name, is_present, url in rows:
        present = "present" if is_present else "missing"
        default = " (default)" if name in (DEFAULT_PROPOSER, DEFAULT_ENCODER) else ""
        _say(f"  {kind:<8} {name:<{width}}  {present:<7}  {url}{default}")
    return 0


# ---------------------------------------------------------------------------- parser


def _add_model_options(p: argparse.ArgumentParser, proposer_help: str) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--proposer", default=DEFAULT_PROPOSER,
                   help=f"{proposer_help} A SAM2 name (see 'refseg models') or an import path "
                        f"package.module:Class (default {DEFAULT_PROPOSER}).")
    g.add_argument("--proposer-checkpoint", metavar="PATH", help="local SAM2 checkpoint instead of the cached one")
    g.add_argument("--encoder-checkpoint", metavar="PATH",
                   help="local encoder checkpoint (DINOv2, DINOv3, C-RADIO) instead of the cached one")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps or auto (default: auto)")
    g.add_argument("--cache-dir", metavar="DIR", help="checkpoint cache (default $REFSEG_CACHE_DIR or ~/.cache/refseg)")
    g.add_argument("--offline", action="store_true", help="never download; use cached or given checkpoints only")
    g.add_argument("--random-weights", action="store_true",
                   help="randomly initialised networks (seeded): tries the flow without checkpoints; results are "
                        "meaningless")


def _add_bank_options(p: argparse.ArgumentParser, images_help: str) -> None:
    """--bank, --images and --encoder of the commands that label with a bank."""
    p.add_argument("--bank", required=True, help="memory bank from 'refseg build-bank'")
    p.add_argument("--images", required=True, help=images_help)
    p.add_argument("--encoder", default=None,
                   help="encoder name or import path (default: the registered model the bank was built with)")


def _add_settings_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("settings")
    g.add_argument("--preset", default="default",
                   help="settings preset: default (the paper's method, exact boxes), paper (the published numbers, "
                        "with the reference's one-pixel-short COCO result boxes), fast (bf16, faster decoder) or diffusion "
                        "(graph-diffusion re-scoring instead of soft merging; beyond the paper)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one setting, e.g. --set merge.top_k=50 --set proposal.points_per_side=16 "
                        "(repeatable; sections: reference, proposal, match, merge, rescore, output, precision)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``refseg`` command."""
    parser = argparse.ArgumentParser(
        prog="refseg",
        description="Training-free reference-based instance segmentation: SAM2 mask proposals matched to a "
                    "memory bank of DINOv2 reference embeddings.",
        epilog="Typical flow: refseg sample -> refseg build-bank -> refseg predict -> refseg evaluate / render. "
               "Try 'refseg demo' for an offline run on synthetic data.",
    )
    parser.add_argument("--version", action="version", version=f"refseg {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("sample", parents=[common], help="draw an N-shot reference set from a COCO file",
                       description="Draw N references per class (distinct images, one instance each) as the paper "
                                   "did: random.seed(SEED), classes in order of first appearance, each class's "
                                   "annotations shuffled and walked; valid = not crowd, box >= MIN_SIZE px, "
                                   ">= BORDER px from the image borders. Writes a COCO file of the references.")
    p.add_argument("--coco", required=True, help="COCO instances file to sample from (e.g. instances_train2017.json)")
    p.add_argument("--shots", type=int, required=True, help="references per class")
    p.add_argument("--seed", type=int, default=33, help="random seed (paper: 33)")
    p.add_argument("--classes", help="'voc' (the 20 PASCAL VOC classes) or a comma list of names or ids "
                                     "(default: all)")
    p.add_argument("--min-size", type=float, default=32, help="minimum box width and height in px (default 32)")
    p.add_argument("--border", type=float, default=10, help="minimum distance of the box to the borders (default 10)")
    p.add_argument("--allow-fewer", action="store_true", help="take what exists when a class has fewer valid "
                                                              "instances than --shots (default: error)")
    p.add_argument("--out", required=True, help="output COCO file of the references")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("build-bank", parents=[common], help="encode references into a memory bank",
                       description="Encode every annotation of a COCO file (polygon, RLE or box-only) into a "
                                   "memory bank. Box-only references are turned into masks with the proposer, "
                                   "which is loaded only then. Prints what was used and what was skipped.")
    p.add_argument("--references", required=True, help="COCO file of the references (e.g. from 'refseg sample')")
    p.add_argument("--images", required=True, help="folder of the reference images")
    p.add_argument("--out", required=True, help="output bank (.safetensors)")
    p.add_argument("--encoder", default=DEFAULT_ENCODER,
                   help=f"DINOv2 name or import path package.module:Class (default {DEFAULT_ENCODER})")
    p.add_argument("--input-size", type=int, default=None,
                   help="encoder input size in px (default: the encoder's own, 518 for DINOv2)")
    p.add_argument("--classes", help="only these classes: 'voc' or a comma list of names or ids")
    p.add_argument("--add-to", metavar="BANK", help="add to this existing bank instead of starting a new one")
    p.add_argument("--negative", action="store_true", help="store the references as negatives of their class")
    p.add_argument("--batch-size", type=int, default=8, help="references per encoder call (default 8)")
    _add_model_options(p, "Used only for box-only references.")
    _add_settings_options(p)
    p.set_defaults(func=cmd_build_bank)

    p = sub.add_parser("predict", parents=[common], help="label target images with a memory bank (resumable)",
                       description="Label every image of a folder (ids 1..N in name order) or of a COCO file with "
                                   "the bank's classes and write COCO results. Progress is kept in "
                                   "<out>.partial.jsonl: rerunning the same command skips finished images and "
                                   "retries failed ones. Also writes <out>.categories.json and <out>.images.json.")
    _add_bank_options(p, "folder of the target images")
    p.add_argument("--coco", help="COCO file listing the target images (category ids are matched by name)")
    p.add_argument("--out", required=True, help="output COCO results file (.json)")
    p.add_argument("--batch-size", type=int, default=1, help="images per network call (default 1)")
    p.add_argument("--devices", metavar="LIST", default=None,
                   help="label on several local devices at once, one worker process each: 'all' (every GPU) or a "
                        "list such as cuda:0,cuda:1; each batch of --batch-size images per device")
    p.add_argument("--candidate-cache", metavar="DIR", default=None,
                   help="keep each image's proposals and features under DIR (a sub-folder per model and proposal "
                        "settings): a rerun with another bank or other match/merge settings then runs no network "
                        "on the images already there")
    p.add_argument("--class-thresholds", action="store_true",
                   help="drop detections below their class's threshold stored with the bank by 'refseg calibrate' "
                        "(the same as --set merge.class_thresholds=true)")
    p.add_argument("--limit", type=int, help="only the first N target images")
    p.add_argument("--restart", action="store_true", help="discard earlier progress of this output")
    p.add_argument("--remove-partial", action="store_true",
                   help="delete <out>.partial.jsonl after a run with no failed image")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_options(p, "Mask proposals.")
    _add_settings_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("calibrate", parents=[common], help="per-class score thresholds that reach a precision",
                       description="Label each reference image of a bank with the bank minus its own references, "
                                   "match the detections to the image's annotated instances (IoU >= 0.5) and choose "
                                   "per class the lowest score threshold whose detections reach --target-precision. "
                                   "The thresholds are stored with the bank; 'refseg predict --class-thresholds' "
                                   "applies them. The reference images' instances of the bank's classes must all be "
                                   "annotated in --ground-truth.")
    _add_bank_options(p, "folder of the reference images")
    p.add_argument("--ground-truth", required=True,
                   help="COCO file with every instance of the reference images (e.g. the training annotations the "
                        "references were sampled from)")
    p.add_argument("--target-precision", type=float, default=0.9, help="precision each class must reach (0.9)")
    p.add_argument("--prompt-share", type=float, default=None, metavar="SHARE",
                   help="also choose the prompt similarity threshold that keeps this share of the references' "
                        "detections (e.g. 0.95); 'refseg predict --set proposal.prompt_similarity=bank' then "
                        "decodes only the prompts near a class prototype (faster)")
    p.add_argument("--out", help="write the bank with its thresholds here (default: replace --bank)")
    _add_model_options(p, "Mask proposals.")
    _add_settings_options(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("evaluate", parents=[common], help="COCO AP of a results file",
                       description="pycocotools COCOeval on every ground-truth image (images without detections "
                                   "count), optionally restricted to a class subset (paper: --classes voc).")
    p.add_argument("--gt", required=True, help="ground-truth COCO file (e.g. instances_val2017.json)")
    p.add_argument("--results", required=True, help="COCO results file from 'refseg predict'")
    p.add_argument("--classes", help="'voc' or a comma list of names or ids (default: all ground-truth classes)")
    p.add_argument("--iou-types", default="bbox,segm", help="bbox, segm or both (default bbox,segm)")
    p.add_argument("--json-out", metavar="PATH", help="also write the statistics to this JSON file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("render", parents=[common], help="draw results over their images (PNG)",
                       description="Draw masks, boxes and 'class score' labels of a results file over its images.")
    p.add_argument("--images", required=True, help="folder of the images")
    p.add_argument("--results", required=True, help="COCO results file")
    p.add_argument("--out", required=True, help="output folder for the PNG files")
    p.add_argument("--gt", help="COCO file of the images (file names, class names); default: the "
                                "<results>.images.json written by predict")
    p.add_argument("--max-images", type=int, default=20, help="render at most N images (default 20)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="hide detections below (default 0.5)")
    p.add_argument("--max-detections", type=int, default=30, help="at most N detections per image (default 30)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("demo", parents=[common], help="offline end-to-end run on synthetic data (seconds, no weights)",
                       description="Make a synthetic COCO dataset, sample references, build a bank and predict "
                                   "with the toy colour components of refseg.testing, evaluate and render. Runs "
                                   "the same steps as the commands it prints.")
    p.add_argument("--out", default="refseg_demo", help="output folder (default ./refseg_demo)")
    p.add_argument("--shots", type=int, default=2, help="references per class (default 2)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("models", parents=[common], help="list the SAM2 / DINOv2 models and their checkpoints",
                       description="Registered model names, official checkpoint URLs and whether each checkpoint "
                                   "is in the cache.")
    p.add_argument("--cache-dir", metavar="DIR", help="checkpoint cache (default $REFSEG_CACHE_DIR or ~/.cache/refseg)")
    p.set_defaults(func=cmd_models)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """What ends a command in one line with exit code 2: refseg's own errors (:class:`refseg.RefsegError`),
    usage errors and the operating system's refusals (missing files, permissions, full disks...).
    Anything else (a ValueError from deep in numpy...) is a bug: traceback, exit code 1."""
    from refseg.errors import RefsegError

    return UsageError, RefsegError, OSError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``refseg`` command; returns the exit code (0 ok, 2 user error, 3 finished with failed images)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, argparse errors
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if not getattr(args, "command", None):
        parser.print_help()
        return 2

    def show(message, category, filename, lineno, file=None, line=None):
        _warn(str(message))

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into a reader that stopped (| head): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except _user_errors() as exc:
        if args.debug:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"refseg {args.command}: error: {message}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as exc:  # a labelling run says what it kept (refseg.runtime.labelling)
        print(f"refseg: {exc.args[0]}" if exc.args else "refseg: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
