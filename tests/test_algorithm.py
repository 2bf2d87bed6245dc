"""Each step of the method against hand-computed values, and the whole pipeline on planted instances.

Uses the deterministic plug-in components of refseg.testing (real implementations of the
two interfaces, no weights) so that every expected number can be worked out by hand.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from refseg import PAPER, Detections, MemoryBank, Reference, ReferenceEncoder, Segmenter, UnusableReference
from refseg.method.config import PRESETS, PipelineConfig, get_preset
from refseg.method.matching import interpolation_matrix, match_to_prototypes, pool_features
from refseg.method.merging import class_aware_nms, intersections_by_class, mask_boxes, soft_merge, top_k
from refseg.method.pipeline import Candidates
from refseg.method.references import crop_window
from refseg.method.results import coco_bboxes, decode_rle, encode_rle, encode_rles, masks_to_boxes
from refseg.testing import coco_bank, ColorEncoder, ColorRegionProposer, PALETTE, make_synthetic_coco

TOY = PAPER.with_overrides(**{"proposal.image_size": 512})


# ---------------------------------------------------------------- settings
def test_paper_preset_holds_the_published_numbers():
    p = get_preset("paper")
    assert (p.proposal.image_size, p.proposal.points_per_side, p.proposal.pred_iou_threshold) == (1024, 32, 0.4)
    assert (p.merge.nms_iou, p.merge.max_after_nms, p.merge.top_k) == (0.5, 800, 100)
    assert p.reference.context_scale == 1.2 and p.precision == "fp32" and p.output.paper_box
    assert p.proposal.add_no_mem_embed is False and p.merge.soft_merge and p.merge.merge_resolution is None


def test_only_the_paper_preset_writes_short_boxes():
    """The paper's one-pixel-short COCO boxes are opt-in: the paper preset only, never the defaults."""
    assert get_preset("paper").output.paper_box is True
    assert [n for n, p in PRESETS.items() if p.output.paper_box] == ["paper"]
    assert PipelineConfig().output.paper_box is False and get_preset("default") == PipelineConfig()
    # the paper preset is the default's method plus the short boxes, nothing else
    assert dataclasses.replace(PAPER, name="default", output=PipelineConfig().output) == PipelineConfig()


def test_overrides_are_dotted_typed_and_checked():
    cfg = PAPER.with_overrides(**{"merge.top_k": "50", "precision": "bf16", "merge.soft_merge": "false"})
    assert cfg.merge.top_k == 50 and cfg.precision == "bf16" and cfg.merge.soft_merge is False
    assert PAPER.merge.top_k == 100  # presets are immutable
    with pytest.raises(KeyError, match="unknown setting 'topk'"):
        PAPER.with_overrides(**{"merge.topk": 3})
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("turbo")


# ---------------------------------------------------------------- pooling
def test_interpolation_matrix_is_bilinear_resize():
    torch.manual_seed(0)
    t = torch.randn(5, 7)
    ry, rx = interpolation_matrix(5, 16), interpolation_matrix(7, 12)
    expected = F.interpolate(t[None, None], size=(16, 12), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(ry @ t @ rx.T, expected, atol=1e-5, rtol=1e-5)


def test_pool_features_equals_mean_of_upsampled_features_inside_mask():
    torch.manual_seed(1)
    g, d, size = 6, 8, 32
    feats = torch.randn(g, g, d)
    masks = torch.rand(4, size, size) > 0.6
    masks[3] = False  # empty: no feature
    pooled, valid = pool_features(masks, feats)
    up = F.interpolate(feats.permute(2, 0, 1)[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    for i in range(3):
        mean = up[:, masks[i]].mean(dim=1)
        torch.testing.assert_close(pooled[i], F.normalize(mean, dim=0), atol=1e-5, rtol=1e-4)
    assert valid.tolist() == [True, True, True, False]


# ---------------------------------------------------------------- matching
def test_matching_by_cosine_with_clamp_and_argmax():
    feats = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0], [0.0, -1.0]])
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # third class has no reference
    scores, labels, vetoed = match_to_prototypes(feats, protos)
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.8, 0.0, 0.0]))
    assert labels[:2].tolist() == [0, 1] and not vetoed.any()


def test_negative_reference_vetoes_its_class_only():
    feats = torch.tensor([[0.8, 0.6], [1.0, 0.0]])
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # a negative of class 0 sitting right on the first proposal
    negs, neg_labels = torch.tensor([[0.8, 0.6]]), torch.tensor([0])
    scores, labels, vetoed = match_to_prototypes(feats, protos, negs, neg_labels)
    assert vetoed.tolist() == [True, False]
    torch.testing.assert_close(scores, torch.tensor([0.0, 1.0]))
    # a negative of the other class does nothing
    scores, _, vetoed = match_to_prototypes(feats, protos, negs, torch.tensor([1]))
    assert not vetoed.any() and scores[0] == pytest.approx(0.8)


# ---------------------------------------------------------------- NMS, merging, top-k
def _box_mask(h, w, x1, y1, x2, y2):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y1:y2, x1:x2] = True
    return m


def test_nms_is_class_aware_and_ranked_by_predicted_iou_not_score():
    masks = torch.stack([_box_mask(20, 20, 0, 0, 10, 10), _box_mask(20, 20, 0, 0, 10, 9),
                         _box_mask(20, 20, 0, 0, 10, 10), _box_mask(20, 20, 12, 12, 18, 18)])
    boxes = mask_boxes(masks)
    torch.testing.assert_close(boxes[0], torch.tensor([0.0, 0.0, 9.0, 9.0]))  # inclusive indices
    pred_iou = torch.tensor([0.7, 0.9, 0.8, 0.5])
    labels = torch.tensor([0, 0, 1, 0])
    keep = class_aware_nms(boxes, pred_iou, labels, 0.5, 800)
    # 0 and 1 overlap (IoU 0.9) in class 0: the higher predicted IoU (1) wins whatever the scores
    assert keep.tolist() == [1, 2, 3]
    assert class_aware_nms(boxes, pred_iou, labels, 0.5, 2).tolist() == [1, 2]


def test_soft_merge_matches_hand_computation():
    h = w = 10
    a = _box_mask(h, w, 0, 0, 10, 5)  # 50 px, ranked first
    b = _box_mask(h, w, 0, 0, 5, 10)  # 50 px; |a ∩ b| = 25
    c = _box_mask(h, w, 0, 0, 5, 5)  # 25 px, inside both
    d = _box_mask(h, w, 0, 0, 10, 10)  # other class: never decays the others
    masks = torch.stack([a, b, c, d])
    feats = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0]]), dim=1)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 0, 1])
    pred_iou = torch.tensor([0.95, 0.9, 0.85, 0.99])
    inter = intersections_by_class(masks, labels)
    assert inter[0, 1] == 25 and inter[2, 2] == 25 and inter[0, 3] == 0
    out = soft_merge(masks, scores, labels, pred_iou, feats)
    d_b = 25 / 50 * 0.6  # IoS(b, a) * (f_b . f_a)
    d_c = max(1.0 * 0.0, 1.0 * 0.8)  # c is inside a (f . = 0) and inside b (f . = 0.8)
    expected = torch.tensor([0.9, 0.8 * math.sqrt(1 - d_b), 0.7 * math.sqrt(1 - d_c), 0.6])
    torch.testing.assert_close(out, expected)


def test_soft_merge_uses_original_scores_not_sequential_decay():
    # a ⊃ b ⊃ c with identical features: each lower-ranked mask is fully covered by a higher one
    masks = torch.stack([_box_mask(8, 8, 0, 0, 8, 8), _box_mask(8, 8, 0, 0, 4, 8), _box_mask(8, 8, 0, 0, 4, 4)])
    feats = torch.tensor([[1.0, 0.0]] * 3)
    out = soft_merge(masks, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.long),
                     torch.tensor([0.9, 0.8, 0.7]), feats)
    torch.testing.assert_close(out, torch.tensor([0.9, 0.0, 0.0]))


def test_top_k_and_threshold():
    s = torch.tensor([0.1, 0.5, 0.3, 0.5])
    assert top_k(s, 3).tolist() == [1, 3, 2]
    assert top_k(s, 10, min_score=0.3).tolist() == [1, 3, 2]


# ---------------------------------------------------------------- boxes and COCO records
def test_box_conventions_paper_and_exact():
    m = np.zeros((1, 10, 12), dtype=bool)
    m[0, 2:5, 3:9] = True  # rows 2..4, cols 3..8
    assert masks_to_boxes(m).tolist() == [[3, 2, 9, 5]]  # exact: x2, y2 one past the last pixel
    assert coco_bboxes(masks_to_boxes(m)).tolist() == [[3, 2, 6, 3]]
    assert coco_bboxes(masks_to_boxes(m), paper_box=True).tolist() == [[3, 2, 5, 2]]  # the paper's, one short
    det = Detections.from_masks(m, np.array([0.5], np.float32), np.array([0]), ["cat"])
    assert det.boxes.tolist() == [[3, 2, 9, 5]] and det.boxes.dtype == np.float32
    rec = det.to_coco(7, {"cat": 17})[0]
    assert rec["bbox"] == [3.0, 2.0, 6.0, 3.0] and rec["category_id"] == 17 and rec["image_id"] == 7
    assert (decode_rle(rec["segmentation"]) == m[0]).all()
    # the paper's COCO box: one pixel short; computed from the mask, whatever boxes the Detections hold
    assert det.to_coco(7, {"cat": 17}, paper_box=True)[0]["bbox"] == [3.0, 2.0, 5.0, 2.0]
    det.boxes = np.array([[0, 0, 12, 10]], np.float32)
    assert det.to_coco(7)[0]["bbox"] == [3.0, 2.0, 6.0, 3.0] and det.to_coco(7, paper_box=True)[0]["bbox"] == [
        3.0, 2.0, 5.0, 2.0]
    # a one-pixel mask and an empty one
    m = np.zeros((2, 10, 12), dtype=bool)
    m[0, 4, 7] = True
    det = Detections.from_masks(m, np.array([0.5, 0.4], np.float32), np.array([0, 0]), ["cat"])
    assert [r["bbox"] for r in det.to_coco(1)] == [[7.0, 4.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    assert [r["bbox"] for r in det.to_coco(1, paper_box=True)] == [[7.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    # the same records as pycocotools' own box of each mask's RLE
    assert [r["bbox"] for r in det.to_coco(1)] == mask_utils.toBbox(det.rles()).tolist()


def test_rle_roundtrip_uncompressed_counts():
    m = np.zeros((6, 5), dtype=bool)
    m[1:4, 2:5] = True
    assert (decode_rle(encode_rle(m)) == m).all()
    uncompressed = {"size": [6, 5], "counts": [13, 3, 3, 3, 3, 3, 2]}  # column-major runs
    assert (decode_rle(uncompressed) == m).all()


# ---------------------------------------------------------------- references
def test_crop_window_is_centred_square_clipped_to_image():
    # box 10..30 x 20..60 -> w 20, h 40 -> side 48 centred at (20, 40)
    assert crop_window((10.7, 20.2, 30.9, 60.5), 100, 100, 1.2) == (-4 + 4, 16, 44, 64)
    assert crop_window((0, 0, 10, 10), 100, 100, 1.2) == (0, 0, 11, 11)


def test_reference_embedding_is_soft_mask_weighted_mean_of_patch_features():
    enc = ColorEncoder(input_size=56, patch_size=14)
    img = np.zeros((40, 40, 3), dtype=np.uint8)
    img[:] = PALETTE["background"]
    img[10:30, 10:30] = PALETTE["red"]
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:30, 10:30] = True
    emb = ReferenceEncoder(enc).embed([Reference(img, "red", mask=mask)])[0]
    # by hand: crop side 24 centred at 20 -> [8, 32); resized to 56; patch corners at 0, 14, 28, 42
    x1, y1, x2, y2 = crop_window((10, 10, 30, 30), 40, 40, 1.2)
    crop = torch.from_numpy(img[y1:y2, x1:x2]).permute(2, 0, 1).float()[None] / 255
    crop = F.interpolate(crop, size=(56, 56), mode="bicubic", align_corners=False, antialias=False)  # not clamped
    soft = F.interpolate(torch.from_numpy(mask[y1:y2, x1:x2]).float()[None, None], size=(56, 56),
                         mode="bilinear", align_corners=False)[0, 0]
    wts = soft[0::14, 0::14]
    feats = enc.encode(crop)[0]
    expected = (feats * wts[..., None]).sum((0, 1)) / wts.sum()
    torch.testing.assert_close(emb, expected)
    assert int(emb.argmax()) == list(PALETTE).index("red")


def test_reference_crop_keeps_bicubic_overshoot():
    """The crop the encoder sees is torch's bicubic resize itself: values beyond [0, 1] at strong edges are kept."""
    seen = []

    class Recording(ColorEncoder):
        def encode(self, images):
            seen.append(images.clone())
            return super().encode(images)

    img = np.zeros((40, 40, 3), dtype=np.uint8)
    img[:, 20:] = 255  # a black/white edge
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:30, 10:30] = True
    ReferenceEncoder(Recording(input_size=56, patch_size=14)).embed([Reference(img, "a", mask=mask)])
    x1, y1, x2, y2 = crop_window((10, 10, 30, 30), 40, 40, 1.2)
    crop = torch.from_numpy(img[y1:y2, x1:x2]).permute(2, 0, 1).float()[None] / 255
    want = F.interpolate(crop, size=(56, 56), mode="bicubic", align_corners=False, antialias=False)
    assert torch.equal(seen[0], want)
    assert seen[0].min() < 0 and seen[0].max() > 1


def test_unusable_references_are_reported_not_fatal():
    enc = ColorEncoder(input_size=56, patch_size=14)
    img = np.full((40, 40, 3), 128, dtype=np.uint8)
    empty = np.zeros((40, 40), dtype=bool)
    thin = np.zeros((40, 40), dtype=bool)
    thin[1, :] = True  # a one-pixel line in a 40 px box: resized to 56 px it lies between patch corners
    good = np.zeros((40, 40), dtype=bool)
    good[10:30, 10:30] = True
    refs = [Reference(img, "a", mask=empty, source={"id": 1}), Reference(img, "b", mask=thin, box=(0, 0, 40, 40), source={"id": 2}),
            Reference(img, "c", mask=good, source={"id": 3}), Reference(img, "d", source={"id": 4})]
    bank, report = ReferenceEncoder(enc).build_bank(refs)
    assert bank.class_names == ["c"] and report.used == {"c": 1}
    reasons = {src["id"]: reason for src, _, reason in report.skipped}
    assert reasons[1] == "empty mask" and "too thin" in reasons[2] and "neither a mask nor a box" in reasons[4]


def test_box_only_reference_uses_proposer_masks():
    enc, prop = ColorEncoder(input_size=56, patch_size=14), ColorRegionProposer()
    img = np.full((64, 64, 3), PALETTE["background"], dtype=np.uint8)
    img[16:48, 16:48] = PALETTE["green"]
    renc = ReferenceEncoder(enc, proposer=prop, proposal_image_size=64)
    mask = renc.mask_from_box(img, (16, 16, 48, 48))
    assert mask[16:48, 16:48].mean() > 0.95 and mask.sum() < 32 * 32 * 1.1
    emb = renc.embed([Reference(img, "green", box=(16, 16, 48, 48))])[0]
    assert int(emb.argmax()) == list(PALETTE).index("green")
    with pytest.raises(UnusableReference, match="no proposal model"):
        ReferenceEncoder(enc).mask_from_box(img, (16, 16, 48, 48))


# ---------------------------------------------------------------- the whole pipeline
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    image_dir, json_path = make_synthetic_coco(tmp_path_factory.mktemp("syn"), n_images=10, seed=1)
    return image_dir, COCO(str(json_path))


def test_pipeline_recovers_planted_instances(synthetic):
    image_dir, coco = synthetic
    enc, prop = ColorEncoder(), ColorRegionProposer()
    bank = coco_bank(coco, image_dir, [1, 2, 3], enc, prop, TOY)
    seg = Segmenter(prop, enc, bank, TOY)
    cat_ids = {c["name"]: c["id"] for c in coco.cats.values()}
    targets = [i for i in coco.imgs if i > 3]
    results = []
    for img_id, dets in zip(targets, seg.predict_many([image_dir / coco.imgs[i]["file_name"] for i in targets], 3)):
        assert dets.masks.shape[1:] == (192, 256) and dets.masks.dtype == bool
        assert np.all(np.diff(dets.scores) <= 0) and np.all((dets.scores >= 0) & (dets.scores <= 1))
        results += dets.to_coco(img_id, cat_ids)
    ev = COCOeval(coco, coco.loadRes(results), "segm")
    ev.params.imgIds = targets
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] > 0.9, f"mask AP {ev.stats[0]:.3f}"
    # every confident detection is a planted instance of its class (distractors and duplicates score low)
    from pycocotools import mask as mask_utils
    for r in results:
        if r["score"] > 0.5:
            gts = coco.loadAnns(coco.getAnnIds(imgIds=[r["image_id"]], catIds=[r["category_id"]]))
            ious = mask_utils.iou([r["segmentation"]], [g["segmentation"] for g in gts], [0] * len(gts))
            assert len(gts) and ious.max() > 0.5, r["bbox"]


def test_soft_merge_on_synthetic_duplicates_and_top_k(synthetic):
    image_dir, coco = synthetic
    enc, prop = ColorEncoder(), ColorRegionProposer()
    bank = coco_bank(coco, image_dir, [1, 2, 3], enc, prop, TOY)
    img = image_dir / coco.imgs[5]["file_name"]
    no_nms = TOY.with_overrides(**{"merge.nms_iou": 1.0})
    dets = Segmenter(prop, enc, bank, no_nms).predict(img)
    # every planted instance comes with its shrunk duplicate, which soft merging pushes down
    high, low = dets.scores[dets.pred_iou > 0.9], dets.scores[dets.pred_iou < 0.9]
    assert len(low) > 0 and low.max() < high.min()
    assert len(Segmenter(prop, enc, bank, no_nms.with_overrides(**{"merge.top_k": 2})).predict(img)) == 2


def test_image_without_proposals_gives_empty_result():
    enc, prop = ColorEncoder(), ColorRegionProposer()
    bank = MemoryBank(enc.settings())
    bank.add("red", torch.eye(enc.dim)[1])
    grey = np.full((50, 70, 3), PALETTE["background"], dtype=np.uint8)
    dets = Segmenter(prop, enc, bank, TOY).predict(grey)
    assert len(dets) == 0 and dets.masks.shape == (0, 50, 70) and dets.to_coco(1) == []
    seg = Segmenter(prop, enc, bank, TOY)
    empty = Candidates(torch.zeros(0, 128, 128), torch.zeros(0), torch.zeros(0, enc.dim), (50, 70))
    assert len(seg.label(empty)) == 0


def test_fast_merge_resolution_agrees_with_paper_on_synthetic(synthetic):
    image_dir, coco = synthetic
    enc, prop = ColorEncoder(), ColorRegionProposer()
    bank = coco_bank(coco, image_dir, [1, 2, 3], enc, prop, TOY)
    img = image_dir / coco.imgs[6]["file_name"]
    paper = Segmenter(prop, enc, bank, TOY).predict(img)
    coarse = Segmenter(prop, enc, bank, TOY.with_overrides(**{"merge.merge_resolution": 128})).predict(img)
    assert paper.labels.tolist() == coarse.labels.tolist()
    np.testing.assert_allclose(paper.scores, coarse.scores, atol=0.05)


def test_batched_rle_encoding_equals_one_mask_at_a_time():
    rng = np.random.default_rng(0)
    masks = rng.random((7, 33, 45)) > 0.6
    masks[2] = False
    masks[3] = True
    batched = encode_rles(masks)
    assert batched == [encode_rle(m) for m in masks]
    assert all(isinstance(r["counts"], str) and r["size"] == [33, 45] for r in batched)
    assert encode_rles(np.zeros((0, 5, 5), bool)) == []
    assert all((decode_rle(r) == m).all() for r, m in zip(batched, masks))
