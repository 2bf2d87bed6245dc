"""Cached stage 1 (refseg.runtime.candidate_cache): results equal the uncached ones, hits run no network,
foreign settings are refused, corrupt entries are recomputed, and a new bank re-labels from cache."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO

import refseg.io.images
from refseg import PAPER, MemoryBank, Segmenter, load_image
from refseg.runtime.candidate_cache import (CacheError, CacheMismatchError, CandidateCache, decode_logits, encode_logits,
                                    image_key, stage1_settings)
from refseg.testing import coco_bank, ColorEncoder, ColorRegionProposer, make_synthetic_coco

TOY = PAPER.with_overrides(**{"proposal.image_size": 512})


# ---------------------------------------------------------------- helpers
class CallCounter:
    """Counts calls (and images) going into the networks of a segmenter."""

    def __init__(self, seg):
        self.propose = self.encode = self.images = 0
        prop, enc = seg.proposer.propose, seg.encoder.encode

        def propose(images):
            self.propose += 1
            self.images += int(images.shape[0])
            return prop(images)

        def encode(images):
            self.encode += 1
            return enc(images)

        seg.proposer.propose, seg.encoder.encode = propose, encode

    @property
    def calls(self):
        return self.propose + self.encode


def assert_same(got, want, min_iou=0.99):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.labels.tolist() == b.labels.tolist()
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-3, rtol=0)
        assert a.masks.shape == b.masks.shape
        for ma, mb in zip(a.masks, b.masks):
            union = (ma | mb).sum()
            assert union == 0 or (ma & mb).sum() / union >= min_iou


def assert_identical(got, want):
    assert_same(got, want)
    for a, b in zip(got, want):
        assert np.array_equal(a.masks, b.masks) and np.array_equal(a.scores, b.scores)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    image_dir, json_path = make_synthetic_coco(tmp_path_factory.mktemp("syn"), n_images=8, seed=1)
    coco = COCO(str(json_path))
    paths = [image_dir / coco.imgs[i]["file_name"] for i in range(4, 8)]
    return image_dir, coco, paths


@pytest.fixture()
def toy(synthetic):
    image_dir, coco, paths = synthetic
    enc, prop = ColorEncoder(), ColorRegionProposer()
    bank = coco_bank(coco, image_dir, [1, 2, 3], enc, prop, TOY)
    return Segmenter(prop, enc, bank, TOY), paths


# ---------------------------------------------------------------- toy components
def test_cached_results_equal_uncached_and_hits_run_no_network(toy, tmp_path, monkeypatch):
    seg, paths = toy
    want = seg.predict_batch(paths)
    assert sum(len(d) for d in want) > 0
    counter = CallCounter(seg)
    cache = CandidateCache(tmp_path / "cache")
    first = seg.predict_batch(paths, cache=cache)  # all misses: one network batch
    assert (counter.propose, counter.encode, counter.images) == (1, 1, len(paths))
    assert cache.stats == {"hits": 0, "misses": len(paths), "corrupt": 0, "writes": len(paths)}
    assert len(cache) == len(paths) and all(image_key(p) in cache for p in paths)
    assert_identical(first, want)

    decoded = []
    monkeypatch.setattr(refseg.io.images, "load_image", lambda *a: decoded.append(a))  # a hit must not decode
    second = seg.predict_batch(paths, cache=cache)
    third = list(seg.predict_many(paths, batch_size=2, cache=cache))
    assert counter.calls == 2 and not decoded
    assert cache.stats["hits"] == 2 * len(paths) and cache.stats["misses"] == len(paths)
    assert_identical(second, want)
    assert_identical(third, want)
    # a new object on the same directory reads the manifest and hits as well
    again = CandidateCache(tmp_path / "cache")
    assert again.settings == stage1_settings(seg)
    assert_identical([seg.predict(paths[0], cache=again)], want[:1])
    assert counter.calls == 2 and again.stats["hits"] == 1


def test_caller_keys_arrays_and_a_changed_file(toy, tmp_path):
    seg, paths = toy
    cache = CandidateCache(tmp_path / "c")
    rgbs = [load_image(p) for p in paths[:2]]
    want = seg.predict_batch(rgbs)
    counter = CallCounter(seg)
    assert_identical(seg.predict_batch(rgbs, cache=cache), want)  # keys = pixel hashes
    assert_identical(seg.predict_batch([r.copy() for r in rgbs], cache=cache), want)
    assert counter.images == 2
    assert_identical(seg.predict_batch(paths[:2], cache=cache, keys=["img-a", "img-b"]), want)
    assert_identical(seg.predict_batch(paths[:2], cache=cache, keys=["img-a", "img-b"]), want)
    assert counter.images == 4
    with pytest.raises(ValueError, match="keys"):
        seg.predict_batch(paths[:2], keys=["a", "b"])
    # overwriting a file changes its key: a stale entry is never used
    target = tmp_path / "img.png"
    target.write_bytes(paths[0].read_bytes())
    seg.predict(target, cache=cache)
    key = image_key(target)
    target.write_bytes(paths[1].read_bytes())
    os.utime(target, ns=(1, 1))
    assert image_key(target) != key
    assert_identical([seg.predict(target, cache=cache)], want[1:2])
    assert counter.images == 6


def test_changing_the_bank_or_merge_settings_relabels_from_cache(toy, synthetic, tmp_path):
    seg, paths = toy
    image_dir, coco, _ = synthetic
    cache = CandidateCache(tmp_path / "cache")
    seg.predict_batch(paths, cache=cache)
    new_bank = coco_bank(coco, image_dir, [2], seg.encoder, seg.proposer, TOY)
    new_bank.remove_class("green")
    counter = CallCounter(seg)
    seg.set_bank(new_bank)
    got = seg.predict_batch(paths, cache=cache)
    reference = Segmenter(ColorRegionProposer(), ColorEncoder(), new_bank, TOY)
    want = reference.predict_batch(paths)
    assert_identical(got, want)
    assert all("green" not in d.label_names for d in got)

    seg.config = TOY.with_overrides(**{"merge.top_k": 3, "merge.soft_merge": False, "merge.nms_iou": 0.3})
    reference.config = seg.config
    assert_identical(seg.predict_batch(paths, cache=cache), reference.predict_batch(paths))
    assert counter.calls == 0 and cache.stats["hits"] == 2 * len(paths)


def test_other_stage1_settings_are_refused(toy, tmp_path):
    seg, paths = toy
    root = tmp_path / "cache"
    seg.predict_batch(paths[:1], cache=CandidateCache(root))
    settings = json.loads((root / "manifest.json").read_text())["settings"]
    assert settings["proposal"]["image_size"] == 512 and settings["encoder"]["name"] == "color-encoder"
    assert settings["proposer"]["name"] == "color-regions" and settings["precision"] == "fp32"

    bank = seg.bank
    others = {
        "proposal.image_size": Segmenter(ColorRegionProposer(), ColorEncoder(), bank,
                                         TOY.with_overrides(**{"proposal.image_size": 256})),
        "precision": Segmenter(ColorRegionProposer(), ColorEncoder(), bank, TOY.with_overrides(precision="bf16")),
        "mask_threshold": Segmenter(ColorRegionProposer(), ColorEncoder(), bank,
                                    TOY.with_overrides(**{"match.mask_threshold": 1.0})),
        "proposer.class": Segmenter(_OtherProposer(), ColorEncoder(), bank, TOY),
    }
    other_encoder = ColorEncoder(sharpness=10.0)
    bank2 = MemoryBank(other_encoder.settings())
    bank2.add("red", torch.ones(other_encoder.dim))
    others["encoder.sharpness"] = Segmenter(ColorRegionProposer(), other_encoder, bank2, TOY)
    for what, other in others.items():
        counter = CallCounter(other)
        with pytest.raises(CacheMismatchError, match=what.replace(".", r"\.")):
            other.predict_batch(paths[:1], cache=CandidateCache(root))
        assert counter.calls == 0, what
    # the same directory stays usable with the right settings; clear() makes it reusable for others
    same = CandidateCache(root)
    seg.predict_batch(paths[:1], cache=same)
    assert same.stats["hits"] == 1
    same.clear()
    assert not (root / "manifest.json").exists() and len(same) == 0
    other = others["precision"]
    other.predict_batch(paths[:1], cache=same)
    assert CandidateCache(root).settings["precision"] == "bf16"
    with pytest.raises(CacheError, match="not bound"):
        CandidateCache(tmp_path / "fresh").get("x")


class _OtherProposer(ColorRegionProposer):
    pass


def test_corrupt_or_foreign_entries_are_recomputed(toy, tmp_path):
    seg, paths = toy
    cache = CandidateCache(tmp_path / "cache")
    want = seg.predict_batch(paths, cache=cache)
    files = [cache.path_for(image_key(p)) for p in paths]
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])  # truncated (interrupted copy)
    raw = bytearray(files[1].read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside an array: zip CRC
    files[1].write_bytes(bytes(raw))
    files[2].write_bytes(files[3].read_bytes())  # another image's entry under this key
    (files[3].parent / ".tmp-leftover.npz").write_bytes(b"partial")  # a killed writer's temp file

    counter = CallCounter(seg)
    cache = CandidateCache(tmp_path / "cache")
    got = seg.predict_batch(paths, cache=cache)
    assert cache.stats["corrupt"] == 3 and cache.stats["hits"] == 1 and counter.images == 3
    assert_identical(got, want)
    assert len(cache) == len(paths)
    files[3].write_bytes(b"not a zip at all")
    fresh = CandidateCache(tmp_path / "cache")
    assert_identical(seg.predict_batch(paths, cache=fresh), want)
    assert fresh.stats["hits"] == 3 and fresh.stats["corrupt"] == 1 and counter.images == 4


def test_interrupted_write_keeps_the_old_entry(toy, tmp_path, monkeypatch):
    seg, paths = toy
    cache = CandidateCache(tmp_path / "cache", stage1_settings(seg))  # bound without predicting
    cand = seg.propose([load_image(paths[0])])[0]
    path = cache.put("k", cand)
    before = path.read_bytes()

    def boom(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        cache.put("k", seg.propose([load_image(paths[1])])[0])
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # temp file removed
    got = cache.get("k")
    assert torch.equal(got.features, cand.features) and torch.equal(got.pred_iou, cand.pred_iou)
    assert torch.equal(got.logits > 0, cand.logits > 0) and got.image_size == cand.image_size


def test_empty_image_roundtrip(toy, tmp_path):
    seg, _ = toy
    grey = np.full((40, 60, 3), 128, np.uint8)
    cache = CandidateCache(tmp_path / "c")
    first = seg.predict(grey, cache=cache)
    again = seg.predict(grey, cache=cache)
    assert len(first) == len(again) == 0 and again.masks.shape == (0, 40, 60) and cache.stats["hits"] == 1


# ---------------------------------------------------------------- codecs
def smooth_logits(n=40, size=64, seed=0):
    """SAM-like logits: a positive plateau inside a blob, steeply negative outside, saturating."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    out = []
    for _ in range(n):
        cy, cx = torch.rand(2, generator=g) * size
        ry, rx = 1.5 + torch.rand(2, generator=g) * size / 3
        r = torch.sqrt(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2)
        slope = 2 + 10 * torch.rand(1, generator=g)
        out.append((slope * (1 - r) * min(ry, rx) / 2).clamp(-30, 20) + 0.3 * torch.randn(size, size, generator=g))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["smooth", "noise"])
def test_exact_codec_keeps_every_thresholded_mask(kind):
    noise = 0.4 * torch.randn(20, 64, 64, generator=torch.Generator().manual_seed(2))
    logits = smooth_logits() if kind == "smooth" else noise
    logits[0, 5, 5] = 0.0  # exactly on the threshold
    for t in (0.0, 0.7):
        arrays = encode_logits(logits, t, "exact")
        back = decode_logits(arrays, "exact", tuple(logits.shape), t)
        assert torch.equal(back > t, logits > t)
        for size in ((480, 640), (97, 53), (256, 256), (33, 40)):
            up = lambda x: F.interpolate(x[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            assert torch.equal(up(back) > t, up(logits) > t), (kind, t, size)
    if kind == "smooth":  # values only near the zero crossing: far smaller than the raw logits
        assert arrays["values"].nbytes < 0.25 * logits.numel() * 4


def test_lossy_codecs_are_close():
    logits = smooth_logits()
    up = lambda x: F.interpolate(x[:, None], size=(480, 640), mode="bilinear", align_corners=False)[:, 0] > 0
    ref = up(logits)
    for codec, min_iou in (("fp16", 0.999), ("int8", 0.99)):
        back = decode_logits(encode_logits(logits, 0.0, codec), codec, tuple(logits.shape), 0.0)
        assert torch.equal(back > 0, logits > 0), codec  # sign-preserving at low resolution
        got = up(back)
        inter = (got & ref).flatten(1).sum(1).float()
        union = (got | ref).flatten(1).sum(1).float().clamp(min=1)
        assert (inter / union).min() >= min_iou, codec


def test_compact_options_roundtrip(toy, tmp_path):
    seg, paths = toy
    paths = paths[:2]
    want = seg.predict_batch(paths)
    sizes = {}
    for logits, features, compress in (("exact", "fp32", False), ("exact", "fp16", True), ("fp16", "fp32", False),
                                       ("int8", "fp16", True)):
        cache = CandidateCache(tmp_path / f"{logits}-{features}-{compress}", logits=logits, features=features,
                               compress=compress)
        seg.predict_batch(paths, cache=cache)
        assert_same(seg.predict_batch(paths, cache=cache), want)
        assert cache.stats["hits"] == len(paths)
        sizes[(logits, features, compress)] = cache.size_bytes()
    assert sizes[("exact", "fp16", True)] < sizes[("exact", "fp32", False)] < sizes[("fp16", "fp32", False)]
    with pytest.raises(ValueError, match="codec"):
        CandidateCache(tmp_path / "x", logits="jpeg")


# ---------------------------------------------------------------- real random-weight SAM2 + DINOv2
REAL = PAPER.with_overrides(**{"proposal.image_size": 256, "proposal.points_per_side": 4,
                               "proposal.pred_iou_threshold": -1.0})


def _real_models(seed):
    from refseg.models.registry import build_encoder, build_proposer

    torch.manual_seed(seed)
    proposer = build_proposer("sam2.1_hiera_t", device="cpu", config=REAL.proposal, random_init=True)
    encoder = build_encoder("dinov2_vits14", device="cpu", input_size=112, random_init=True)
    return proposer, encoder


def _random_bank(encoder, n_classes, seed):
    bank = MemoryBank(encoder.settings())
    gen = torch.Generator().manual_seed(seed)
    for c in range(n_classes):
        for _ in range(3):
            bank.add(f"class{c}", torch.randn(encoder.dim, generator=gen))
    return bank


def test_real_sam2_dinov2_cached_equals_uncached(synthetic, tmp_path):
    _, _, paths = synthetic
    proposer, encoder = _real_models(0)
    seg = Segmenter(proposer, encoder, _random_bank(encoder, 4, 1), REAL)
    want = seg.predict_batch(paths[:2])
    assert sum(len(d) for d in want) > 0
    cache = CandidateCache(tmp_path / "real")
    counter = CallCounter(seg)
    assert_identical(seg.predict_batch(paths[:2], cache=cache), want)
    assert counter.calls == 2
    assert_identical(seg.predict_batch(paths[:2], cache=cache), want)
    assert counter.calls == 2 and cache.stats["hits"] == 2

    seg.set_bank(_random_bank(encoder, 6, 7))  # new references: re-label from cache only
    relabelled = seg.predict_batch(paths[:2], cache=cache)
    assert counter.calls == 2
    counter_off = Segmenter(proposer, encoder, seg.bank, REAL)
    assert_identical(relabelled, counter_off.predict_batch(paths[:2]))

    # another SAM2 initialisation = other weights: refused, not silently reused
    other_proposer, _ = _real_models(1)
    other = Segmenter(other_proposer, encoder, seg.bank, REAL)
    with pytest.raises(CacheMismatchError, match="proposer.weights"):
        other.predict_batch(paths[:1], cache=CandidateCache(tmp_path / "real"))
