"""The whole pipeline with the real SAM2 and DINOv2 architectures (random weights, small sizes).

Random weights make the answers meaningless, so this checks what must hold whatever the
weights: the real networks plug into every stage, and the outputs have the right types,
shapes and ranges, down to a COCO results file that pycocotools evaluates. The predicted-IoU
filter is disabled (-1) because random networks predict low IoUs; everything else is paper mode.
"""

import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from refseg import PAPER, MemoryBank, Reference, ReferenceEncoder, Segmenter, decode_rle, load_image
from refseg.models.registry import build_encoder, build_proposer
from refseg.testing import make_synthetic_coco

CFG = PAPER.with_overrides(**{"proposal.image_size": 256, "proposal.points_per_side": 6,
                              "proposal.pred_iou_threshold": -1.0, "proposal.prompt_batch_size": 16})


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    proposer = build_proposer("sam2.1_hiera_t", device="cpu", config=CFG.proposal, random_init=True)
    encoder = build_encoder("dinov2_vits14", device="cpu", input_size=112, random_init=True)
    return proposer, encoder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    image_dir, json_path = make_synthetic_coco(tmp_path_factory.mktemp("real"), n_images=4, height=96, width=128,
                                               seed=3)
    return image_dir, json_path, COCO(str(json_path))


def test_real_networks_end_to_end_to_coco_evaluation(models, data, tmp_path):
    proposer, encoder = models
    image_dir, json_path, coco = data
    refs = []
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[1, 2])):
        img = load_image(image_dir / coco.imgs[ann["image_id"]]["file_name"])
        name = coco.cats[ann["category_id"]]["name"]
        if len(refs) == 1:  # one box-only reference: its mask comes from SAM2's box prompt
            x, y, w, h = ann["bbox"]
            refs.append(Reference(img, name, box=(x, y, x + w, y + h), source={"annotation_id": ann["id"]}))
        else:
            refs.append(Reference(img, name, mask=decode_rle(ann["segmentation"]), source={"annotation_id": ann["id"]}))
    renc = ReferenceEncoder(encoder, CFG.reference, proposer, CFG.proposal.image_size)
    bank, report = renc.build_bank(refs)
    assert sum(report.used.values()) + len(report.skipped) == len(refs) and len(bank) >= 1
    assert bank.dim == encoder.dim == 384
    bank_path = bank.save(tmp_path / "bank.safetensors")
    bank = MemoryBank.load(bank_path, encoder.settings())

    seg = Segmenter(proposer, encoder, bank, CFG)
    cands = seg.propose([load_image(image_dir / coco.imgs[i]["file_name"]) for i in (3, 4)])
    for c in cands:
        assert c.logits.shape[1:] == (64, 64) and c.logits.dtype == torch.float32
        assert c.features.shape == (len(c), 384)
        torch.testing.assert_close(c.features.norm(dim=1), torch.ones(len(c)), atol=1e-4, rtol=0)
        assert len(c) <= 36

    cat_ids = {c["name"]: c["id"] for c in coco.cats.values()}
    results = []
    for img_id, cand in zip((3, 4), cands):
        dets = seg.label(cand)
        h, w = coco.imgs[img_id]["height"], coco.imgs[img_id]["width"]
        assert dets.masks.shape[1:] == (h, w) and dets.masks.dtype == bool
        assert dets.boxes.shape == (len(dets), 4) and len(dets) <= CFG.merge.top_k
        assert np.all((dets.scores > 0) & (dets.scores <= 1 + 1e-6)) and np.all(np.diff(dets.scores) <= 1e-7)
        assert set(dets.labels.tolist()) <= set(range(len(bank.class_names)))
        assert np.all(dets.boxes[:, 2] >= dets.boxes[:, 0]) and np.all(dets.boxes[:, 3] >= dets.boxes[:, 1])
        results += dets.to_coco(img_id, cat_ids)
    assert results, "the real networks produced no detection at all"
    out = tmp_path / "results.json"
    out.write_text(json.dumps(results))
    ev = COCOeval(coco, coco.loadRes(str(out)), "segm")
    ev.params.imgIds = [3, 4]
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert 0 <= ev.stats[0] <= 1


def test_batched_images_give_the_same_result_as_one_at_a_time(models, data):
    proposer, encoder = models
    image_dir, _, coco = data
    bank = MemoryBank(encoder.settings())
    gen = torch.Generator().manual_seed(1)
    for name in ("red", "green"):
        bank.add(name, torch.randn(encoder.dim, generator=gen))
    seg = Segmenter(proposer, encoder, bank, CFG)
    paths = [image_dir / coco.imgs[i]["file_name"] for i in (1, 2)]
    batched = seg.predict_batch(paths)
    single = [seg.predict(p) for p in paths]
    assert sum(len(d) for d in single) > 0
    for a, b in zip(batched, single):
        assert a.labels.tolist() == b.labels.tolist()
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
        assert (a.masks != b.masks).mean() < 1e-3
