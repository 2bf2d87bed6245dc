#!/usr/bin/env python
"""Stage 2 alone (matching, NMS, soft merging, output masks) on SAM-like candidates, at any image size.

Random-weight networks give noise-like proposals that NMS reduces to one or two, which makes
their stage 2 unrealistically cheap; this script feeds :meth:`Segmenter.label` smooth
blob-shaped logits instead (``rematch.synthetic_sam_logits``), with random unit features
and a random bank, and reports the time per image and the peak host memory (the process's
maximum resident set: run one configuration per process).

Examples:
  python benchmarks/stage2.py                                  # 600 proposals on 640x480, paper preset
  python benchmarks/stage2.py --height 3024 --width 4032        # a 12 MP photo
  python benchmarks/stage2.py --preset fast --proposals 800
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rematch import machine_info, synthetic_sam_logits  # noqa: E402

from refseg import MemoryBank, Segmenter  # noqa: E402
from refseg.method.config import get_preset  # noqa: E402
from refseg.method.pipeline import Candidates  # noqa: E402


class _FeatureSpace:
    """Stands in for the encoder: stage 2 only needs its settings and dimension (no network runs)."""

    def __init__(self, dim: int):
        self.dim, self.device, self.input_size = dim, torch.device("cpu"), 518

    def settings(self) -> dict:
        return {"name": "stage2-benchmark", "dim": self.dim}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proposals", type=int, default=600, help="candidates per image")
    p.add_argument("--logit-size", type=int, default=256, help="side of the low-resolution logits (SAM2: 256)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--dim", type=int, default=1024, help="feature dimension (DINOv2-L: 1024)")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--preset", default="paper")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (the best is reported) after one warm-up")
    p.add_argument("--json", default=None, help="write the figures here as JSON")
    args = p.parse_args(argv)

    space = _FeatureSpace(args.dim)
    gen = torch.Generator().manual_seed(1)
    bank = MemoryBank(space.settings())
    for c in range(args.classes):
        for _ in range(3):
            bank.add(f"class{c}", torch.randn(args.dim, generator=gen))
    cand = Candidates(synthetic_sam_logits(args.proposals, args.logit_size, seed=1),
                      0.5 + 0.5 * torch.rand(args.proposals, generator=gen),
                      torch.nn.functional.normalize(torch.randn(args.proposals, args.dim, generator=gen), dim=1),
                      (args.height, args.width))
    seg = Segmenter(None, space, bank, get_preset(args.preset))  # type: ignore[arg-type]: label() runs no network
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seg.label(cand)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        dets = seg.label(cand)
        times.append(time.perf_counter() - t)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    writing = []
    for _ in range(args.repeats):  # what 'refseg predict' does with each image's detections
        t = time.perf_counter()
        dets.to_coco(1)
        writing.append(time.perf_counter() - t)
    out = {"machine": machine_info(torch.device("cpu")), "args": vars(args), "detections": len(dets),
           "best_s": min(times), "times_s": times, "peak_host_mb": peak_mb, "host_mb_before_stage2": rss_before,
           "coco_records_s": min(writing)}
    print(f"stage 2, preset {args.preset}: {args.proposals} SAM-like candidates ({args.logit_size}^2 logits, "
          f"D={args.dim}) on {args.height}x{args.width}: {len(dets)} detections, best of {args.repeats} "
          f"{min(times):.3f} s/image, peak host memory {peak_mb:.0f} MB ({rss_before:.0f} MB before stage 2); "
          f"COCO records (RLE) {1000 * min(writing):.1f} ms/image")
    print(f"machine: {json.dumps(out['machine'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
