#!/usr/bin/env python
"""Time the whole refseg pipeline and each of its stages on synthetic images.

Networks have random weights: the compute of SAM2 and DINOv2 does not depend on the
values of their weights, so the timings are those of the real models. (The number of
proposals surviving the IoU filter does depend on the weights; the benchmark reports it.
``--keep-all-proposals`` sets the filter to keep every prompt's mask, the worst case.)

Examples:
  python benchmarks/benchmark.py --small                      # CPU, a couple of minutes
  python benchmarks/benchmark.py --preset paper --images 50   # GPU, paper settings (SAM2-L, DINOv2-L, 32x32)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import refseg
import refseg.method.pipeline as pipeline_module
from refseg import MemoryBank, Segmenter, load_image
from refseg.models.devices import select_device
from refseg.models.registry import DEFAULT_ENCODER, DEFAULT_PROPOSER
from refseg.runtime.run_spec import RunSpec
from refseg.testing import draw_scene

# "merging": soft merging, including the masks it upsamples to measure overlaps; "upsampling": the kept top-k
# masks at full resolution
STAGES = ("image decode", "SAM2 encoder", "prompt decoding", "DINOv2", "pooling", "matching+NMS", "upsampling",
          "merging", "writing")


class StageTimer:
    """Accumulates wall time per stage; synchronises the GPU at stage edges so times are real."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self.enabled = True

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str):
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            if self.enabled:
                self.totals[name] += time.perf_counter() - t0

    def wrap(self, fn, name: str):
        @functools.wraps(fn)  # keeps the signature (prompt selection looks for propose's prompt_mask)
        def timed(*args, **kwargs):
            with self.stage(name):
                return fn(*args, **kwargs)
        return timed


def instrument(seg: Segmenter, timer: StageTimer) -> None:
    """Time the stages without touching the library: wrap the functions the pipeline calls."""
    for attr, name in (("match_to_prototypes", "matching+NMS"), ("class_aware_nms", "matching+NMS"),
                       ("upsampled_intersections", "merging"), ("soft_merge_scores", "merging"),
                       ("pool_features", "pooling"),
                       ("window_masks", "upsampling")):
        setattr(pipeline_module, attr, timer.wrap(getattr(pipeline_module, attr), name))
    seg.encoder.encode = timer.wrap(seg.encoder.encode, "DINOv2")
    model = getattr(seg.proposer, "model", None)
    if model is not None and hasattr(model, "image_encoder"):
        state = {}

        def pre(_m, _i):
            timer.sync()
            state["t"] = time.perf_counter()

        def post(_m, _i, _o):
            timer.sync()
            if timer.enabled:
                timer.totals["SAM2 encoder"] += time.perf_counter() - state["t"]

        model.image_encoder.register_forward_pre_hook(pre)
        model.image_encoder.register_forward_hook(post)
    seg.proposer.propose = timer.wrap(seg.proposer.propose, "_propose total")


def make_images(n: int, height: int, width: int, out_dir: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    from PIL import Image
    for i in range(n):
        img, _ = draw_scene(rng, height, width, 6)
        p = out_dir / f"bench_{i:04d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "refseg": refseg.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper", help="settings preset (paper, fast)")
    p.add_argument("--proposer", default=DEFAULT_PROPOSER, help="proposal model name or import path")
    p.add_argument("--encoder", default=None,
                   help=f"feature encoder: a registered name (DINOv2, DINOv3, C-RADIO; see 'refseg models') or an "
                        f"import path (default {DEFAULT_ENCODER}; dinov2_vits14 with --small)")
    p.add_argument("--device", default=None, help="cuda, cpu, mps (default: best available)")
    p.add_argument("--images", type=int, default=20, help="images timed (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="images run before timing")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="setting override, repeatable")
    p.add_argument("--keep-all-proposals", action="store_true", help="pred_iou_threshold=-1: worst case")
    p.add_argument("--small", action="store_true",
                   help="CPU-sized run: SAM2.1-tiny at 512 px, 8x8 grid, DINOv2-S (or --encoder) at 224, 4 images")
    p.add_argument("--prompt-similarity", type=float, default=None, metavar="T",
                   help="decode only the prompts whose patch feature has cosine >= T to a class prototype "
                        "(proposal.prompt_similarity); reports the share of prompts decoded")
    p.add_argument("--json", default=None, help="write the figures here as JSON")
    args = p.parse_args(argv)

    overrides = list(args.set)
    encoder_size = None  # the encoder's own: 518 for DINOv2, the paper's
    if args.small:
        args.proposer, args.encoder = "sam2.1_hiera_t", args.encoder or "dinov2_vits14"
        args.images, args.warmup, args.height, args.width = min(args.images, 4), 1, 240, 320
        overrides = ["proposal.image_size=512", "proposal.points_per_side=8", *overrides]
        encoder_size = 224  # a multiple of both 14 (DINOv2) and 16 (DINOv3, C-RADIO)
    args.encoder = args.encoder or DEFAULT_ENCODER
    if args.keep_all_proposals:
        overrides.append("proposal.pred_iou_threshold=-1")
    if args.prompt_similarity is not None:
        overrides.append(f"proposal.prompt_similarity={args.prompt_similarity}")
    spec = RunSpec(proposer=args.proposer, encoder=args.encoder, preset=args.preset, overrides=overrides,
                   encoder_input_size=encoder_size, random_init=True)
    cfg = spec.config()
    device = select_device(args.device)

    print(f"refseg benchmark: {args.proposer} + {args.encoder}, preset {cfg.name}, device {device}")
    print("weights: random (compute does not depend on weight values; timings are those of the real networks)")
    t0 = time.perf_counter()
    proposer = spec.build_proposer(device)
    encoder = spec.build_encoder(device)
    build_s = time.perf_counter() - t0
    bank = MemoryBank(encoder.settings())
    gen = torch.Generator().manual_seed(0)
    for c in range(20):  # 20 classes x 30 shots, like COCO-FSOD
        for _ in range(30):
            bank.add(f"class{c}", torch.randn(encoder.dim, generator=gen))
    seg = Segmenter(proposer, encoder, bank, cfg)
    timer = StageTimer(device)
    instrument(seg, timer)
    decoded: list[float] = []  # per image, the share of its prompts decoded
    if args.prompt_similarity is not None:
        propose = seg.proposer.propose

        @functools.wraps(propose)
        def counting(images, prompt_mask=None):
            decoded.extend(prompt_mask.float().mean(dim=1).tolist())
            return propose(images, prompt_mask=prompt_mask)

        seg.proposer.propose = counting

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(args.warmup + args.images, args.height, args.width, Path(tmp))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        n_props, n_dets = [], []

        def run(batch_paths):
            with timer.stage("image decode"):
                rgbs = [load_image(x) for x in batch_paths]
            cands = seg.propose(rgbs)
            n_props.extend(len(c) for c in cands)
            for i, c in enumerate(cands):
                dets = seg.label(c)
                n_dets.append(len(dets))
                with timer.stage("writing"):
                    json.dumps(dets.to_coco(i))

        timer.enabled = False
        for i in range(0, args.warmup, args.batch_size):
            run(paths[i:i + args.batch_size])
        timer.enabled = True
        n_props.clear(), n_dets.clear(), decoded.clear()
        timer.sync()
        start = time.perf_counter()
        timed = paths[args.warmup:]
        for i in range(0, len(timed), args.batch_size):
            run(timed[i:i + args.batch_size])
        timer.sync()
        wall = time.perf_counter() - start

    totals = dict(timer.totals)
    propose_total = totals.pop("_propose total", 0.0)
    totals["prompt decoding"] = max(0.0, propose_total - totals.get("SAM2 encoder", 0.0))
    n = args.images
    per_stage_ms = {s: 1000 * totals.get(s, 0.0) / n for s in STAGES}
    result = {
        "machine": machine_info(device),
        "settings": {"proposer": args.proposer, "encoder": args.encoder, "encoder_input": encoder_size,
                     "preset": cfg.name, "config": cfg.to_dict(), "batch_size": args.batch_size,
                     "image_hw": [args.height, args.width], "images": n, "warmup": args.warmup},
        "weights": "random",
        "model_build_s": round(build_s, 2),
        "images_per_s": round(n / wall, 3),
        "ms_per_image": round(1000 * wall / n, 1),
        "ms_per_stage": {k: round(v, 2) for k, v in per_stage_ms.items()},
        "proposals_per_image": round(float(np.mean(n_props)), 1) if n_props else 0,
        "detections_per_image": round(float(np.mean(n_dets)), 1) if n_dets else 0,
        "prompt_similarity": args.prompt_similarity,
        "prompts_decoded_share": round(float(np.mean(decoded)), 3) if decoded else 1.0,
        "peak_host_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda"
        else None,
    }
    print(f"machine: {result['machine']}")
    print(f"{n} images of {args.height}x{args.width}, batch {args.batch_size}: "
          f"{result['images_per_s']} images/s ({result['ms_per_image']} ms/image)")
    for stage, ms in result["ms_per_stage"].items():
        print(f"  {stage:<16} {ms:10.2f} ms/image")
    print(f"proposals/image {result['proposals_per_image']}, detections/image {result['detections_per_image']}")
    print(f"prompts decoded: {result['prompts_decoded_share']:.1%} (prompt similarity {args.prompt_similarity})")
    print(f"peak host memory {result['peak_host_memory_mb']} MB, peak GPU memory {result['peak_gpu_memory_mb']} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
