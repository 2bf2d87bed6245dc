"""Graph-diffusion re-scoring (refseg.method.rescoring): hand-computed graphs, the closed form, soft merging as
its special case bit for bit, and an end-to-end run on synthetic scenes with fragmented proposals."""

import numpy as np
import pytest
import torch

from refseg import PAPER, PRESETS, Segmenter
from refseg.method.merging import overlap_edges, soft_merge_scores
from refseg.method.rescoring import diffusion_penalty, diffusion_rescore, forward_substitution
from refseg.runtime.run_spec import RunSpec
from refseg.testing import ColorEncoder, ColorRegionProposer, coco_bank, make_synthetic_coco

# float32 arithmetic on values <= 1: a few units of float32 rounding (2**-23 ~ 1.2e-7) per step
TOL = 1e-6


def counts(*masks):
    """Intersection counts [N, N] of 1-D bool masks (pixels as positions)."""
    m = torch.tensor(masks, dtype=torch.float64)
    return m @ m.T


def test_a_fragment_inside_a_whole_object():
    whole, part = [1] * 10, [1] * 4 + [0] * 6
    inter = counts(whole, part)
    scores = torch.tensor([0.8, 0.9])
    out = diffusion_rescore(inter, scores, torch.tensor([0, 0]), torch.tensor([0.9, 0.5]), None, alpha=0.3)
    # the part lies wholly inside the better-ranked whole: w = 1, pi = (1 - 0.3) * 1; the whole is untouched
    assert out[0] == scores[0]
    assert out[1].item() == pytest.approx(0.9 * 0.3 ** 0.5, abs=TOL)


def test_a_chain_of_nested_fragments_loses_more_further_down():
    a, b, c = [1] * 8, [1] * 4 + [0] * 4, [1] * 2 + [0] * 6
    inter, labels, rank = counts(a, b, c), torch.zeros(3, dtype=torch.long), torch.tensor([0.9, 0.8, 0.7])
    pi = diffusion_penalty(overlap_edges(inter, labels, rank, None), labels, 0.3, 30, 1e-6, False)
    # pi_a = 0; pi_b = 0.7 * 1 + 0.3 * (1 * pi_a) = 0.7; pi_c = 0.7 * 1 + 0.3 * (1 * pi_a + 1 * pi_b) = 0.91
    np.testing.assert_allclose(pi.numpy(), [0.0, 0.7, 0.91], atol=TOL)
    normalised = diffusion_penalty(overlap_edges(inter, labels, rank, None), labels, 0.3, 30, 1e-6, True)
    # row-normalised P: row c is (0.5, 0.5): pi_c = 0.7 + 0.3 * (0.5 * 0 + 0.5 * 0.7) = 0.805
    np.testing.assert_allclose(normalised.numpy(), [0.0, 0.7, 0.805], atol=TOL)
    # soft merging (alpha 0) penalises b and c alike
    flat = diffusion_penalty(overlap_edges(inter, labels, rank, None), labels, 0.0, 30, 1e-6, False)
    np.testing.assert_allclose(flat.numpy(), [0.0, 1.0, 1.0], atol=0)


def test_a_half_covered_proposal_and_other_classes():
    top, half = [1, 1, 0, 0], [0, 1, 1, 0]
    inter = counts(top, half)
    out = diffusion_rescore(inter, torch.tensor([1.0, 1.0]), torch.tensor([0, 0]), torch.tensor([0.9, 0.8]), None,
                            alpha=0.3, exponent=1.0)
    assert out[1].item() == pytest.approx(1 - 0.7 * 0.5, abs=TOL)
    # the same overlap across two classes is no edge
    apart = diffusion_rescore(inter, torch.tensor([1.0, 1.0]), torch.tensor([0, 1]), torch.tensor([0.9, 0.8]), None)
    assert torch.equal(apart, torch.tensor([1.0, 1.0]))


def test_ties_rank_the_earlier_detection_higher():
    same = [1, 1, 1]
    inter = counts(same, same)
    out = diffusion_rescore(inter, torch.tensor([1.0, 1.0]), torch.tensor([0, 0]), torch.tensor([0.5, 0.5]), None)
    assert out[0] == 1.0 and out[1] < 1.0
    swapped = diffusion_rescore(inter, torch.tensor([1.0, 1.0]), torch.tensor([0, 0]), torch.tensor([0.5, 0.6]), None)
    assert swapped[1] == 1.0 and swapped[0] < 1.0


@pytest.mark.parametrize("row_normalise", [False, True])
@pytest.mark.parametrize("alpha", [0.3, 0.7])
def test_iteration_equals_the_closed_form_for_small_graphs(alpha, row_normalise):
    gen = torch.Generator().manual_seed(0)
    for m in (2, 5, 17, 30):
        masks = (torch.rand(m, 400, generator=gen) < torch.rand(m, 1, generator=gen)).double()
        masks[:, 0] = 1  # no empty mask
        inter = masks @ masks.T
        rank = torch.rand(m, generator=gen)
        labels = torch.zeros(m, dtype=torch.long)
        edges = overlap_edges(inter, labels, rank, None)
        iterated = diffusion_penalty(edges, labels, alpha, 30, 0.0, row_normalise)
        closed = forward_substitution(edges, torch.argsort(rank, descending=True), alpha, row_normalise)
        # m <= 30 steps reach the fixed point; the sums differ only in float32 rounding of values <= 1
        np.testing.assert_allclose(iterated.numpy(), closed.numpy(), atol=m * TOL)


def test_soft_merging_is_the_special_case_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    for n in (2, 7, 60):
        masks = torch.rand(n, 32, 32, generator=gen) < 0.3
        masks[:, 0, 0] = True
        labels = torch.randint(0, 3, (n,), generator=gen)
        flat = masks.reshape(n, -1).double()
        inter = (flat @ flat.T) * (labels[:, None] == labels[None, :])
        scores, pred_iou = torch.rand(n, generator=gen), torch.rand(n, generator=gen).round(decimals=1)  # ties
        features = torch.nn.functional.normalize(torch.randn(n, 16, generator=gen), dim=1)
        soft = soft_merge_scores(inter, scores, labels, pred_iou, features)
        special = diffusion_rescore(inter, scores, labels, pred_iou, features, alpha=0.0, exponent=0.5)
        assert torch.equal(soft, special)


class FragmentingProposer(ColorRegionProposer):
    """Each region, plus its left 40 % (a part) that the proposer rates higher than the whole (as SAM often does
    with parts), so that ranked by predicted IoU the part outranks its object."""

    def propose(self, images):
        out = []
        for props in super().propose(images):
            whole = props.logits[props.pred_iou > 0.9] > 0
            parts = []
            for m in whole:
                cols = m.any(0).nonzero().squeeze(1)
                cut = int(cols[0]) + max(1, int(0.4 * (int(cols[-1]) - int(cols[0]) + 1)))
                part = m.clone()
                part[:, cut:] = False
                parts.append(part)
            masks = torch.cat([whole, torch.stack(parts)]) if parts else whole
            pred_iou = torch.cat([torch.full((len(whole),), 0.95), torch.full((len(parts),), 0.97)])
            out.append(type(props)(torch.where(masks, 8.0, -8.0), pred_iou))
        return out


def _nested_pairs(dets):
    """(whole, part) index pairs of the same class where the part's mask lies inside the whole's."""
    pairs = []
    for i in range(len(dets)):
        for j in range(len(dets)):
            if i != j and dets.labels[i] == dets.labels[j] and dets.masks[j].sum() < dets.masks[i].sum() \
                    and not (dets.masks[j] & ~dets.masks[i]).any():
                pairs.append((i, j))
    return pairs


def test_end_to_end_diffusion_ranks_whole_objects_above_their_parts(tmp_path):
    from pycocotools.coco import COCO

    image_dir, json_path = make_synthetic_coco(tmp_path, n_images=5, seed=9)
    coco = COCO(str(json_path))
    spec = RunSpec(preset="diffusion", overrides="proposal.image_size=512, rescore.ranking=area")
    assert PRESETS["diffusion"].rescore.diffusion and not PAPER.rescore.diffusion
    bank = coco_bank(coco, image_dir, [1], ColorEncoder(), ColorRegionProposer(), spec.config())
    base = PAPER.with_overrides(**{"proposal.image_size": 512})
    paper = Segmenter(FragmentingProposer(), ColorEncoder(), bank, base)
    raw = Segmenter(FragmentingProposer(), ColorEncoder(), bank, base.with_overrides(**{"merge.soft_merge": False}))
    diffusion = Segmenter(FragmentingProposer(), ColorEncoder(), bank, spec.config())
    part_first = whole_first = 0
    for image_id in range(2, 6):
        path = image_dir / coco.imgs[image_id]["file_name"]
        p, d, r = paper.predict(path), diffusion.predict(path), raw.predict(path)
        matched = {m.tobytes(): s for m, s in zip(r.masks, r.scores)}  # each detection's score before re-scoring

        def objects(dets):
            # pairs of a class's object and its part (both matched well: not a distractor region)
            return [(w, q) for w, q in _nested_pairs(dets)
                    if min(matched[dets.masks[w].tobytes()], matched[dets.masks[q].tobytes()]) > 0.5]

        assert objects(d), "the scene has objects with their parts proposed"
        for whole, part in objects(d):
            assert d.scores[whole] > d.scores[part]
            whole_first += 1
        part_first += sum(p.scores[part] > p.scores[whole] for whole, part in objects(p))
    # soft merging ranked by predicted IoU keeps the (higher-rated) parts above their objects
    assert whole_first >= 8 and part_first >= 8


def test_the_diffusion_settings_are_checked():
    with pytest.raises(ValueError, match="setting rescore.ranking must be one of pred_iou, score, area"):
        PAPER.with_overrides(**{"rescore.ranking": "size"})
    with pytest.raises(ValueError, match="setting rescore.alpha must be a number in"):
        PAPER.with_overrides(**{"rescore.alpha": "1.5"})
    cfg = RunSpec(preset="paper", overrides="rescore.diffusion=true, rescore.alpha=0, rescore.semantic=true").config()
    assert cfg.rescore.diffusion and cfg.rescore.alpha == 0
