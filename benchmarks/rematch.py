#!/usr/bin/env python
"""Re-matching from the candidate cache versus running the whole pipeline, per image.

For each image: stage 1 + stage 2 without cache (image decode, SAM2 + DINOv2, matching/NMS/
upsampling/merging), then the same image re-labelled with ANOTHER memory bank from a
CandidateCache (no decode, no network: read + decode the entry, then stage 2). Prints both
times, their ratio, the bytes per cache entry, and checks that the cached result equals the
uncached stage 2 with the new bank (labels, scores, mask IoU).

Weights are random: the compute of SAM2 and DINOv2 does not depend on the weight values,
so stage-1 times are those of the real networks. Random networks give noise-like mask
logits (many zero crossings) and predicted IoUs around 0.54, so every grid prompt passes the
paper's 0.4 filter: the cache entries are the worst case for the "exact" logits codec. The
"--sizes" table also encodes SAM-like smooth synthetic logits (300 proposals at 256x256,
1024-d features, as with SAM2 at 1024 px and DINOv2-L) to estimate sizes with trained weights.

Examples:
  python benchmarks/rematch.py --image-size 512 --grid 16 --images 3 --sizes
  python benchmarks/rematch.py --image-size 1024 --grid 32 --images 2 --warmup 0   # paper grid, minutes on CPU
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import refseg
from refseg import PAPER, MemoryBank, Segmenter, load_image
from refseg.runtime.candidate_cache import CandidateCache, decode_logits, encode_logits, image_key
from refseg.models.devices import select_device
from refseg.method.pipeline import Candidates
from refseg.models.registry import build_encoder, build_proposer
from refseg.testing import draw_scene


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
            "torch": torch.__version__, "numpy": np.__version__, "refseg": refseg.__version__, "device": str(device)}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def random_bank(encoder, classes: int, shots: int, seed: int) -> MemoryBank:
    bank = MemoryBank(encoder.settings())
    gen = torch.Generator().manual_seed(seed)
    for c in range(classes):
        for _ in range(shots):
            bank.add(f"class{c}", torch.randn(encoder.dim, generator=gen))
    return bank


def synthetic_sam_logits(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth SAM-like logits: positive plateau inside a blob, steep negative outside, saturating."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    out = torch.empty(n, size, size)
    for i in range(n):
        cy, cx = (torch.rand(2, generator=g) * size).tolist()
        ry, rx = (2 + torch.rand(2, generator=g) ** 2 * size / 2).tolist()
        r = torch.sqrt(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2)
        slope = 1 + 4 * float(torch.rand(1, generator=g))
        out[i] = (slope * (1 - r) * min(ry, rx)).clamp(-32, 24) + 0.2 * torch.randn(size, size, generator=g)
    return out


def entry_bytes(cand: Candidates, logits: str, features: str, compress: bool, threshold: float = 0.0) -> int:
    arrays = encode_logits(cand.logits, threshold, logits)
    arrays["pred_iou"] = cand.pred_iou.numpy().astype(np.float32)
    arrays["features"] = cand.features.numpy().astype(np.float16 if features == "fp16" else np.float32)
    arrays["meta"] = np.array(json.dumps({"x": "about 300 bytes of metadata" * 10}))
    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, **arrays)
    return len(buf.getvalue())


OPTIONS = [("exact", "fp32", False), ("exact", "fp16", False), ("exact", "fp16", True), ("fp16", "fp32", False),
           ("fp16", "fp16", True), ("int8", "fp16", False), ("int8", "fp16", True)]


def mask_agreement(seg: Segmenter, cand: Candidates, logits_codec: str, features_codec: str) -> dict:
    """Stage 2 on decoded candidates versus on the originals."""
    t = seg.config.match.mask_threshold
    back = decode_logits(encode_logits(cand.logits, t, logits_codec), logits_codec, tuple(cand.logits.shape), t)
    feats = cand.features.half().float() if features_codec == "fp16" else cand.features
    a = seg.label(cand)
    b = seg.label(Candidates(back, cand.pred_iou, feats, cand.image_size))
    return compare(b, a)


def compare(got, want) -> dict:
    same_labels = got.labels.tolist() == want.labels.tolist()
    out = {"same_labels": same_labels, "n": len(want)}
    if same_labels and len(want):
        inter = (got.masks & want.masks).reshape(len(want), -1).sum(1)
        union = np.maximum((got.masks | want.masks).reshape(len(want), -1).sum(1), 1)
        out["min_mask_iou"] = float((inter / union).min())
        out["identical_masks"] = bool(np.array_equal(got.masks, want.masks))
        out["max_score_diff"] = float(np.abs(got.scores - want.scores).max())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proposer", default="sam2.1_hiera_t", help="SAM2 model name (random weights)")
    p.add_argument("--encoder", default="dinov2_vits14", help="DINOv2 model name (random weights)")
    p.add_argument("--image-size", type=int, default=512, help="proposal.image_size (paper: 1024)")
    p.add_argument("--grid", type=int, default=16, help="proposal.points_per_side (paper: 32)")
    p.add_argument("--encoder-size", type=int, default=518, help="DINOv2 input size (paper: 518)")
    p.add_argument("--images", type=int, default=2, help="images timed")
    p.add_argument("--warmup", type=int, default=1, help="untimed images first (first-call overheads)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--classes", type=int, default=20, help="bank classes (x --shots references each)")
    p.add_argument("--shots", type=int, default=30)
    p.add_argument("--logits", default="exact", choices=("exact", "fp16", "int8"), help="cache logits codec")
    p.add_argument("--features", default="fp32", choices=("fp32", "fp16"), help="cache features codec")
    p.add_argument("--compress", action="store_true", help="deflate cache entries")
    p.add_argument("--cache-dir", default=None, help="cache directory (default: a temporary one)")
    p.add_argument("--synthetic-proposals", type=int, default=300, help="SAM-like candidates for a realistic stage 2")
    p.add_argument("--sizes", action="store_true", help="also tabulate bytes/decode time/agreement of every codec")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="setting override, repeatable")
    p.add_argument("--json", default=None, help="write the figures here as JSON")
    args = p.parse_args(argv)

    device = select_device(args.device)
    cfg = PAPER.with_overrides(**{"proposal.image_size": args.image_size, "proposal.points_per_side": args.grid})
    cfg = cfg.with_overrides(**dict(kv.split("=", 1) for kv in args.set))
    info = machine_info(device)
    print("refseg re-matching benchmark")
    print(f"machine: {json.dumps(info)}")
    print(f"torch {torch.__version__}; WEIGHTS ARE RANDOM (compute is that of the real networks; outputs are not)")
    print(f"models: {args.proposer} at {args.image_size} px, {args.grid}x{args.grid} prompts; {args.encoder} at "
          f"{args.encoder_size} px; bank {args.classes} classes x {args.shots} shots; images {args.height}x{args.width}")

    torch.manual_seed(0)
    t0 = time.perf_counter()
    proposer = build_proposer(args.proposer, device=device, config=cfg.proposal, random_init=True)
    encoder = build_encoder(args.encoder, device=device, input_size=args.encoder_size, random_init=True)
    print(f"models built in {time.perf_counter() - t0:.1f} s")
    bank_a = random_bank(encoder, args.classes, args.shots, 1)
    bank_b = random_bank(encoder, args.classes, args.shots, 2)  # "the references changed"
    seg = Segmenter(proposer, encoder, bank_a, cfg)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        paths = []
        from PIL import Image
        for i in range(args.warmup + args.images):
            img, _ = draw_scene(rng, args.height, args.width, 6)
            paths.append(Path(tmp) / f"img_{i:03d}.jpg")
            Image.fromarray(img).save(paths[-1], quality=90)
        cache = CandidateCache(args.cache_dir or Path(tmp) / "cache", logits=args.logits, features=args.features,
                               compress=args.compress)
        cache.bind(seg.stage1_settings())

        for i, path in enumerate(paths):
            timed = i >= args.warmup
            # ---- uncached: decode + stage 1 + stage 2 (bank A), as predict_batch does
            seg.set_bank(bank_a)
            t = time.perf_counter()
            rgb = load_image(path)
            t_load = time.perf_counter() - t
            t = time.perf_counter()
            cand = seg.propose([rgb])[0]
            t_stage1 = time.perf_counter() - t
            t = time.perf_counter()
            seg.label(cand)
            t_stage2_a = time.perf_counter() - t
            # ---- store (what a cache miss adds)
            key = image_key(path)
            t = time.perf_counter()
            cache.put(key, cand)
            t_write = time.perf_counter() - t
            # ---- references changed: uncached stage 2 with bank B (ground truth for the cached result)
            seg.set_bank(bank_b)
            t = time.perf_counter()
            want = seg.label(cand)
            t_stage2_b = time.perf_counter() - t
            # ---- cached re-matching with bank B: what predict_batch(..., cache=...) does on a hit
            t = time.perf_counter()
            got = seg.predict_batch([path], cache=cache)[0]
            t_cached = time.perf_counter() - t
            t = time.perf_counter()
            hit = cache.get(key)
            t_read = time.perf_counter() - t
            assert hit is not None
            row = {"image": i, "proposals": len(cand), "detections": len(want), "load_s": t_load,
                   "stage1_s": t_stage1, "stage2_bank_a_s": t_stage2_a, "stage2_bank_b_s": t_stage2_b,
                   "uncached_s": t_load + t_stage1 + t_stage2_b, "cache_write_s": t_write,
                   "cached_s": t_cached, "cache_read_decode_s": t_read,
                   "entry_bytes": cache.path_for(key).stat().st_size, "agreement": compare(got, want)}
            row["speedup"] = row["uncached_s"] / row["cached_s"]
            print(f"{'image' if timed else 'warm-up'} {i}: {len(cand)} proposals, {len(want)} detections | "
                  f"uncached {row['uncached_s']:.2f} s (decode {t_load * 1e3:.0f} ms, stage 1 {t_stage1:.2f} s, "
                  f"stage 2 {t_stage2_b * 1e3:.0f} ms) | cached {t_cached * 1e3:.0f} ms (read+decode entry "
                  f"{t_read * 1e3:.0f} ms) | x{row['speedup']:.0f} | entry {row['entry_bytes'] / 1e6:.2f} MB, "
                  f"write {t_write * 1e3:.0f} ms | agreement {row['agreement']}")
            if timed:
                rows.append(row)
            last_cand = cand

        summary = {k: float(np.mean([r[k] for r in rows])) for k in
                   ("proposals", "uncached_s", "stage1_s", "stage2_bank_b_s", "cached_s", "cache_read_decode_s",
                    "cache_write_s", "entry_bytes")}
        summary["speedup_of_means"] = summary["uncached_s"] / summary["cached_s"]
        summary["all_equal"] = all(r["agreement"]["same_labels"] and r["agreement"].get("identical_masks", True)
                                   for r in rows)
        print(f"\nmean over {len(rows)} images: uncached {summary['uncached_s']:.2f} s/image "
              f"(stage 1 {summary['stage1_s']:.2f} s, stage 2 {summary['stage2_bank_b_s'] * 1e3:.0f} ms); cached "
              f"re-matching {summary['cached_s'] * 1e3:.0f} ms/image (of which read+decode "
              f"{summary['cache_read_decode_s'] * 1e3:.0f} ms); speed-up x{summary['speedup_of_means']:.0f}; "
              f"{summary['proposals']:.0f} proposals/image, entry {summary['entry_bytes'] / 1e6:.2f} MB "
              f"(codec logits={args.logits} features={args.features} compress={args.compress}); "
              f"cached == uncached: {summary['all_equal']}")

        # ---- stage 2 on SAM-like candidates: random-weight proposals are noise whose boxes cover the image,
        # so NMS leaves 1-2 detections and their stage 2 is unrealistically cheap; smooth blobs keep ~100.
        m = args.image_size // 4
        gen = torch.Generator().manual_seed(3)
        like = Candidates(synthetic_sam_logits(args.synthetic_proposals, m, seed=1),
                          0.5 + 0.5 * torch.rand(args.synthetic_proposals, generator=gen),
                          torch.nn.functional.normalize(torch.randn(args.synthetic_proposals, encoder.dim,
                                                                    generator=gen), dim=1), (args.height, args.width))
        cache.put("sam-like", like)
        seg.set_bank(bank_b)
        t_like_uncached, t_like_cached, t_like_read = [], [], []
        for _ in range(3):
            t = time.perf_counter()
            want = seg.label(like)
            t_like_uncached.append(time.perf_counter() - t)
            t = time.perf_counter()
            hit = cache.get("sam-like")
            t_like_read.append(time.perf_counter() - t)
            got = seg.label(hit)
            t_like_cached.append(time.perf_counter() - t)
        like_row = {"proposals": args.synthetic_proposals, "logit_size": m, "detections": len(want),
                    "stage2_s": min(t_like_uncached), "cached_s": min(t_like_cached),
                    "read_decode_s": min(t_like_read), "entry_bytes": cache.path_for("sam-like").stat().st_size,
                    "agreement": compare(got, want)}
        like_row["estimated_speedup"] = (summary["uncached_s"] - summary["stage2_bank_b_s"] + like_row["stage2_s"]) \
            / like_row["cached_s"]
        summary["sam_like"] = like_row
        print(f"SAM-like candidates ({args.synthetic_proposals} smooth masks at {m}x{m}, D={encoder.dim}): "
              f"{len(want)} detections; stage 2 {like_row['stage2_s'] * 1e3:.0f} ms uncached, cached re-matching "
              f"{like_row['cached_s'] * 1e3:.0f} ms (read+decode {like_row['read_decode_s'] * 1e3:.0f} ms), entry "
              f"{like_row['entry_bytes'] / 1e6:.2f} MB, agreement {like_row['agreement']}; speed-up with this stage 2: "
              f"x{like_row['estimated_speedup']:.0f} (mean stage 1 + decode above, plus this stage 2, over cached)")

        sizes = []
        if args.sizes:
            d_paper = 1024
            synth = Candidates(synthetic_sam_logits(300, 256), torch.full((300,), 0.9),
                               torch.nn.functional.normalize(torch.randn(300, d_paper), dim=1), (480, 640))
            print(f"\nbytes per image by codec; agreement = stage 2 (bank B) on decoded vs original candidates "
                  f"of the last image")
            print(f"{'logits':>6} {'feats':>5} {'zip':>5} | {'random-weight':>14} {'decode':>8} | "
                  f"{'SAM-like 300x256x256, D=1024':>28} | agreement on the random-weight image")
            for logits_codec, features_codec, compress in OPTIONS:
                real_b = entry_bytes(last_cand, logits_codec, features_codec, compress)
                synth_b = entry_bytes(synth, logits_codec, features_codec, compress)
                arrays = encode_logits(last_cand.logits, 0.0, logits_codec)
                t = time.perf_counter()
                decode_logits(arrays, logits_codec, tuple(last_cand.logits.shape), 0.0)
                t_dec = time.perf_counter() - t
                agree = mask_agreement(seg, last_cand, logits_codec, features_codec)
                sizes.append({"logits": logits_codec, "features": features_codec, "compress": compress,
                              "random_weight_bytes": real_b, "synthetic_bytes": synth_b, "decode_s": t_dec,
                              "agreement": agree})
                print(f"{logits_codec:>6} {features_codec:>5} {str(compress):>5} | {real_b / 1e6:11.2f} MB "
                      f"{t_dec * 1e3:6.0f}ms | {synth_b / 1e6:25.2f} MB | {agree}")
            raw = 300 * 256 * 256 * 4 + 300 * d_paper * 4
            print(f"(raw float32 of the SAM-like case: {raw / 1e6:.1f} MB; exact-codec values stored for "
                  f"{encode_logits(synth.logits, 0.0, 'exact')['values'].size / synth.logits.numel():.1%} of its cells)")

    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "config": cfg.to_dict(),
                                               "weights": "random", "images": rows, "summary": summary,
                                               "sizes": sizes}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
