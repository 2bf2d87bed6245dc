"""Prompt selection (proposal.prompt_similarity, refseg.method.prompt_selection): off by default, the decoded
prompts' proposals exactly paper mode's, the per-bank threshold keeps the share of detections it promises,
and a stored threshold is refused when missing or stale."""

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from refseg import PAPER, Detections, MemoryBank, Reference, ReferenceEncoder, Segmenter, decode_rle, load_image
from refseg.method.config import PRESETS
from refseg.method.interfaces import supports_prompt_selection
from refseg.method.pipeline import Candidates
from refseg.method.prompt_selection import (PromptSelectionError, choose_prompt_threshold,
                                            detection_prompt_similarities, estimate_prompt_threshold,
                                            point_patches, store_prompt_threshold, stored_prompt_threshold)
from refseg.method.thresholds import HeldOutImage
from refseg.models.sam2_proposer import prompt_batches
from refseg.testing import ColorEncoder, ColorRegionProposer, GridColorProposer, make_synthetic_coco

S = 256
TOY = PAPER.with_overrides(**{"proposal.image_size": S, "proposal.points_per_side": 16})


# ---------------------------------------------------------------- settings


def test_off_in_every_preset_and_read_from_text():
    assert all(p.proposal.prompt_similarity is None for p in PRESETS.values())
    assert PAPER.with_overrides(**{"proposal.prompt_similarity": "0.25"}).proposal.prompt_similarity == 0.25
    on = PAPER.with_overrides(**{"proposal.prompt_similarity": "bank"})
    assert on.proposal.prompt_similarity == "bank"
    assert on.with_overrides(**{"proposal.prompt_similarity": "none"}).proposal.prompt_similarity is None
    for bad in ("1.5", "banks"):
        with pytest.raises(ValueError, match="proposal.prompt_similarity"):
            PAPER.with_overrides(**{"proposal.prompt_similarity": bad})


def test_prompt_batches_keep_each_prompt_in_a_batch_of_its_paper_size():
    paper = prompt_batches(36, 16)
    assert [(len(i), r) for i, r in paper] == [(16, 16), (16, 16), (4, 4)]
    keep = torch.zeros(36, dtype=torch.bool)
    keep[[0, 5, 17, 20, 31, 33, 35]] = True
    batches = prompt_batches(36, 16, keep)
    assert [(len(i), r) for i, r in batches] == [(16, 5), (4, 2)]
    assert torch.cat([i[:r] for i, r in batches]).tolist() == [0, 5, 17, 20, 31, 33, 35]
    assert prompt_batches(36, 16, torch.zeros(36, dtype=torch.bool)) == []
    assert [(len(i), r) for i, r in prompt_batches(32, 16, torch.ones(32, dtype=torch.bool))] == [(16, 16)] * 2


def test_point_patches_map_the_square_frame_onto_the_patch_grid():
    points = torch.tensor([[0.5, 0.5], [255.5, 0.5], [128.0, 200.0]])
    # 256 px frame, encoder at 224 with 14 px patches: a 16 x 16 grid, 16 frame px a patch
    assert point_patches(points, 256, 224, 14).tolist() == [0, 15, 12 * 16 + 8]


def test_choose_threshold_keeps_the_share_and_is_the_highest_that_does():
    sims = np.linspace(-0.5, 0.9, 20)
    for share in (0.5, 0.8, 0.95, 1.0):
        t = choose_prompt_threshold(sims, share)
        assert (sims >= t).mean() >= share
        assert (sims >= np.nextafter(t, 2)).mean() < share  # any higher threshold keeps too few
    assert choose_prompt_threshold([], 0.9) is None
    assert choose_prompt_threshold([0.3, 0.3, 0.3], 0.5) == 0.3


# ---------------------------------------------------------------- toy pipeline


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    image_dir, json_path = make_synthetic_coco(tmp_path_factory.mktemp("prompts"), n_images=4, height=S, width=S,
                                               seed=5)
    coco = COCO(str(json_path))
    proposer, encoder = GridColorProposer(), ColorEncoder()
    refs = []
    for ann in coco.loadAnns(coco.getAnnIds()):
        info = coco.imgs[ann["image_id"]]
        refs.append(Reference(load_image(image_dir / info["file_name"]), coco.cats[ann["category_id"]]["name"],
                              mask=decode_rle(ann["segmentation"]), source={"image": info["file_name"]}))
    bank, _ = ReferenceEncoder(encoder, TOY.reference, proposer, S).build_bank(refs)
    held_out = []
    for info in coco.imgs.values():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]]))
        held_out.append(HeldOutImage(
            image_dir / info["file_name"], [e.id for e in bank.entries if e.source["image"] == info["file_name"]],
            np.array([decode_rle(a["segmentation"]) for a in anns], dtype=bool),
            [coco.cats[a["category_id"]]["name"] for a in anns], name=info["file_name"]))
    return proposer, encoder, bank, held_out


def test_the_chosen_threshold_keeps_the_share_of_leave_one_out_detections(toy):
    proposer, encoder, bank, held_out = toy
    seg = Segmenter(proposer, encoder, bank, TOY)
    for share in (0.6, 0.9):
        found = estimate_prompt_threshold(seg, held_out, share)
        assert found.images == 4 and found.detections > 0 and not found.failed
        assert found.kept / found.detections >= share and found.prompts == 4 * 16 * 16
        assert found.prompts_kept < found.prompts  # the colour features put background prompts far from classes
        # recount independently: each detection's prompt, decoded at the threshold or not
        kept = total = 0
        for item in held_out:
            left = Segmenter(proposer, encoder, bank.without(item.entry_ids), TOY)
            cand = left.propose([load_image(item.image)], with_prompt_similarities=True)[0]
            sims = detection_prompt_similarities(cand, left.label(cand))
            kept, total = kept + int((sims >= found.threshold).sum()), total + len(sims)
        assert (kept, total) == (found.kept, found.detections)


@pytest.mark.parametrize("found", [0, 1])
def test_a_detection_traces_to_its_own_prompt_when_predicted_ious_tie(toy, found):
    """Two candidates with the same predicted IoU: the object one (``found``) is detected, the other matches
    no class. Tracing by predicted IoU could not tell them apart (and took the higher similarity, the other's)."""
    proposer, encoder, bank, _ = toy
    seg = Segmenter(proposer, encoder, bank, TOY)
    logits = torch.full((2, 64, 64), -10.0)
    logits[found, 4:20, 4:20] = logits[1 - found, 40:60, 40:60] = 10.0
    prototype = bank.prototypes()[0]  # unit norm, non-negative colour features
    features = torch.stack([prototype, -prototype] if found == 0 else [-prototype, prototype])
    similarities = torch.zeros(10)
    similarities[[3, 7]] = torch.tensor([0.2, 0.8]) if found == 0 else torch.tensor([0.8, 0.2])
    cand = Candidates(logits, torch.full((2,), 0.9), features, (S, S), prompt_index=torch.tensor([3, 7]),
                      prompt_similarities=similarities)
    dets = seg.label(cand)
    assert len(dets) == 1 and dets.candidate_index.tolist() == [found] and dets.masks[0, 20, 20]
    assert detection_prompt_similarities(cand, dets).tolist() == [pytest.approx(0.2)]  # its own prompt's
    with pytest.raises(PromptSelectionError, match="do not name their candidates"):
        detection_prompt_similarities(cand, Detections(dets.compact, dets.boxes, dets.scores, dets.labels,
                                                       dets.class_names, dets.pred_iou))  # no candidate_index


def test_selection_decodes_only_prompts_near_a_prototype_and_leaves_their_candidates_unchanged(toy):
    proposer, encoder, bank, held_out = toy
    rgb = load_image(held_out[0].image)
    paper = Segmenter(proposer, encoder, bank, TOY).propose([rgb], with_prompt_similarities=True)[0]
    t = float(paper.prompt_similarities.median())
    sel = Segmenter(proposer, encoder, bank, TOY.with_overrides(**{"proposal.prompt_similarity": t}))
    got = sel.propose([rgb])[0]
    decoded = paper.prompt_similarities >= t
    assert bool(decoded[got.prompt_index].all()) and 0 < len(got) < len(paper)
    expected = decoded[paper.prompt_index]  # paper's candidates whose prompt is decoded
    assert torch.equal(got.prompt_index, paper.prompt_index[expected])
    assert torch.equal(got.logits, paper.logits[expected]) and torch.equal(got.pred_iou, paper.pred_iou[expected])
    # pooling is one matrix product over the image's candidates: fewer of them, other float32 rounding
    torch.testing.assert_close(got.features, paper.features[expected], rtol=1e-6, atol=1e-6)
    # the candidates (and a cache of them) depend on the bank and the threshold: stage 1 settings say so
    assert sel.stage1_settings()["prompt_selection"]["threshold"] == t
    assert "prompt_selection" not in Segmenter(proposer, encoder, bank, TOY).stage1_settings()


def test_a_stored_threshold_is_applied_and_refused_when_missing_or_stale(toy, tmp_path):
    proposer, encoder, bank, held_out = toy
    bank = bank.without([])
    on = TOY.with_overrides(**{"proposal.prompt_similarity": "bank"})
    with pytest.raises(PromptSelectionError, match="no prompt similarity threshold"):
        Segmenter(proposer, encoder, bank, on)
    found = estimate_prompt_threshold(Segmenter(proposer, encoder, bank, TOY), held_out, 0.9)
    store_prompt_threshold(bank, found)
    loaded = MemoryBank.load(bank.save(tmp_path / "bank.safetensors"))
    assert stored_prompt_threshold(loaded) == found.threshold
    assert Segmenter(proposer, encoder, loaded, on)._prompt_threshold == found.threshold
    loaded.add("red", torch.randn(loaded.dim))
    with pytest.raises(PromptSelectionError, match="bank changed since"):
        Segmenter(proposer, encoder, loaded, on)


def test_calibrate_bank_estimates_what_is_asked_and_checks_first(toy):
    from refseg.method.calibration import calibrate_bank
    from refseg.method.thresholds import ThresholdError

    proposer, encoder, bank, held_out = toy
    bank = bank.without([])

    def unread():  # the checks come before any image is labelled
        raise AssertionError("labelled before the settings were checked")
        yield

    with pytest.raises(PromptSelectionError, match="needs a proposer with prompt points"):
        calibrate_bank(Segmenter(ColorRegionProposer(), encoder, bank, TOY), unread(), 0.9, 0.95)
    with pytest.raises(ThresholdError, match="nothing to calibrate"):
        calibrate_bank(Segmenter(proposer, encoder, bank, TOY), unread(), None, None)
    with pytest.raises(PromptSelectionError, match=r"share of detections to keep must be in \(0, 1\]"):
        calibrate_bank(Segmenter(proposer, encoder, bank, TOY), unread(), 0.9, 1.5)
    found = calibrate_bank(Segmenter(proposer, encoder, bank, TOY), iter(held_out), None, 0.9)
    assert found.thresholds is None and bank.thresholds == {} and found.images == 4
    assert stored_prompt_threshold(bank) == found.prompt.threshold and found.lines() == [found.prompt.describe()]


def test_a_proposer_without_prompts_works_off_and_is_refused_on(toy):
    _, encoder, bank, held_out = toy
    plain = ColorRegionProposer()
    assert not supports_prompt_selection(plain)
    assert len(Segmenter(plain, encoder, bank, TOY).predict(held_out[0].image)) > 0
    with pytest.raises(PromptSelectionError, match="needs a proposer with prompt points"):
        Segmenter(plain, encoder, bank, TOY.with_overrides(**{"proposal.prompt_similarity": 0.5}))


# ---------------------------------------------------------------- SAM2, random weights


@pytest.mark.parametrize("fast", [False, True])
def test_sam2_decodes_kept_prompts_bit_identically_to_paper_mode(fast):
    from refseg.models.registry import build_proposer

    cfg = PAPER.with_overrides(**{"proposal.image_size": 256, "proposal.points_per_side": 6,
                                  "proposal.pred_iou_threshold": -1.0, "proposal.prompt_batch_size": 16,
                                  "proposal.fast_decoder": fast})
    torch.manual_seed(0)
    proposer = build_proposer("sam2.1_hiera_t", device="cpu", config=cfg.proposal, random_init=True)
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    paper = proposer.propose(images)
    assert [p.prompt_index.tolist() for p in paper] == [list(range(36))] * 2
    mask = torch.zeros(2, 36, dtype=torch.bool)
    mask[0, [1, 2, 3, 17, 33, 34]] = True  # sizes 3, 1 and 2 in batches of 16 and 4: all padded
    mask[1, ::5] = True
    selected = proposer.propose(images, prompt_mask=mask)
    for b in range(2):
        kept = torch.nonzero(mask[b]).squeeze(1)
        assert torch.equal(selected[b].prompt_index, kept)
        assert torch.equal(selected[b].logits, paper[b].logits[kept])
        assert torch.equal(selected[b].pred_iou, paper[b].pred_iou[kept])


def test_cli_calibrate_chooses_the_prompt_threshold_and_predict_applies_it(tmp_path):
    import json

    from refseg.cli import main

    image_dir, json_path = make_synthetic_coco(tmp_path / "data", n_images=4, height=S, width=S, seed=5)
    toy = ["--proposer", "refseg.testing:GridColorProposer", "--encoder", "refseg.testing:ColorEncoder",
           "--device", "cpu", "--set", f"proposal.image_size={S}", "--set", "proposal.points_per_side=16"]
    bank = tmp_path / "bank.safetensors"
    assert main(["build-bank", "--references", str(json_path), "--images", str(image_dir), "--out", str(bank),
                 *toy]) == 0
    main(["calibrate", "--bank", str(bank), "--images", str(image_dir), "--ground-truth", str(json_path),
          "--prompt-share", "0.9", *toy])
    stored = MemoryBank.load(bank).prompt_similarity
    assert stored["share"] == 0.9 and stored["kept"] >= 0.9 * stored["detections"] > 0
    out = tmp_path / "results.json"
    assert main(["predict", "--bank", str(bank), "--coco", str(json_path), "--images", str(image_dir),
                 "--out", str(out), "--quiet", *toy, "--set", "proposal.prompt_similarity=bank"]) == 0
    assert json.loads(out.read_text())
