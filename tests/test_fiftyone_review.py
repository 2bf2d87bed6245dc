"""Correcting auto-labels (refseg_fiftyone.review) on a real FiftyOne dataset with the toy models.

Edits are made in Python the way the App's Annotate tab writes them (a JSON patch that
replaces ``label`` / ``bounding_box`` / ``mask`` of one detection, other attributes kept).
"""

from __future__ import annotations

import numpy as np
import pytest

fo = pytest.importorskip("fiftyone")
from refseg_fiftyone import core, review  # noqa: E402
from refseg_fiftyone.convert import box_to_pixels, detection_mask  # noqa: E402

from test_fiftyone_plugin import build_toy_bank, iou, make_dataset, op  # noqa: E402

H, W = 160, 208  # make_dataset's image size


@pytest.fixture()
def labelled(tmp_path):
    ds = make_dataset(tmp_path / "images", n_images=6)
    build_toy_bank(ds)
    op("auto_label")(ds, score_threshold=0.5, delegate=False)
    yield ds
    ds.delete()


def _busy_sample(ds):
    return ds.exists("refseg").match(fo.ViewField("refseg.detections").length() >= 3).first()


def _relabel(ds, existing="overwrite"):
    return core.auto_label(ds, bank_name="default", label_field="refseg", score_threshold=0.5, existing=existing)


def _shift_box(det, dx):
    x, y, w, h = det.bounding_box
    det.bounding_box = [x + dx, y, w, h]


def test_written_detections_carry_a_fingerprint_and_untouched_ones_are_not_corrections(labelled):
    dets = [d for s in labelled.exists("refseg").iter_samples() for d in s.refseg.detections]
    assert dets and all(d[review.FINGERPRINT_ATTR] == review.fingerprint(d) for d in dets)
    report = review.find_corrections(labelled, "refseg")
    assert (report["num_edited"], report["num_added"], report["num_samples"]) == (0, 0, 0)


def test_find_corrections_marks_edited_boxes_labels_and_added_detections(labelled):
    sample = _busy_sample(labelled)
    d0, d1, d2 = sample.refseg.detections[:3]
    _shift_box(d0, 0.02)  # the App's box edit
    d1.label = "blue" if d1.label != "blue" else "red"  # the App's label edit
    sample.refseg.detections.append(fo.Detection(label="red", bounding_box=[0.05, 0.05, 0.2, 0.2]))
    sample.save()
    report = review.find_corrections(labelled, "refseg")
    assert (report["num_edited"], report["num_added"], report["num_samples"]) == (2, 1, 1)
    sample.reload()
    tagged = [d.id for d in sample.refseg.detections if "corrected" in d.tags]
    assert tagged == [d0.id, d1.id, sample.refseg.detections[-1].id] and d2.id not in tagged
    again = review.find_corrections(labelled, "refseg")
    assert (again["num_edited"], again["num_added"], again["num_already"]) == (0, 0, 3)


def test_remask_gives_a_corrected_box_a_mask_inside_it(labelled):
    sample = _busy_sample(labelled)
    det = sample.refseg.detections[0]
    old_mask = det.mask.copy()
    x, y, w, h = det.bounding_box
    det.bounding_box = [x, y, w * 0.6, h]  # narrower box: the old mask no longer fits it
    sample.save()
    assert review.find_corrections(labelled, "refseg")["num_edited"] == 1
    report = review.remask_boxes(labelled, label_field="refseg", only="corrected", bank_name="default")
    assert (report["num_masks"], report["num_empty"], report["num_failed"]) == (1, 0, 0)
    sample.reload()
    det = sample.refseg.detections[0]
    height, width = H, W
    x1, y1, x2, y2 = box_to_pixels(det.bounding_box, height, width)
    assert det.mask.shape == (y2 - y1, x2 - x1) and det.mask.any()
    assert det.mask.shape != old_mask.shape
    full = detection_mask(det, height, width)
    assert not full[:, :x1].any() and not full[:, x2:].any()  # nothing outside the new box
    assert "corrected" in det.tags
    # the selected-labels mode touches exactly the given labels
    other = sample.refseg.detections[1]
    report = review.remask_boxes(labelled, label_field="refseg", only="selected", label_ids=[other.id],
                                 bank_name="default")
    assert report["num_masks"] == 1
    with pytest.raises(ValueError, match="no label selected"):
        review.remask_boxes(labelled, label_field="refseg", only="selected", label_ids=[])


def test_relabel_keeps_corrections_and_rejections(labelled):
    sample = _busy_sample(labelled)
    before = len(sample.refseg.detections)
    edited, rejected = sample.refseg.detections[0], sample.refseg.detections[1]
    _shift_box(edited, 0.01)
    edited_box = list(edited.bounding_box)
    rejected.tags = ["rejected"]
    sample.save()
    review.find_corrections(labelled, "refseg")
    _relabel(labelled)
    sample.reload()
    dets = {d.id: d for d in sample.refseg.detections}
    assert dets[edited.id].bounding_box == edited_box and "corrected" in dets[edited.id].tags
    assert dets[rejected.id].tags == ["rejected"]
    assert len(dets) == before  # each kept one stands for its new duplicate: nothing doubled
    h, w = H, W
    rejected_mask = detection_mask(rejected, h, w)
    for d in sample.refseg.detections:
        if d.id != rejected.id and d.label == rejected.label:
            assert iou(detection_mask(d, h, w), rejected_mask) < 0.5  # the rejected one did not come back untagged
    # the untouched samples were relabelled as before: fresh ids, no tags
    other = labelled.exists("refseg").match(fo.ViewField("_id") != sample._id).first()
    assert other.refseg.detections and not any(d.tags for d in other.refseg.detections)


def test_added_detection_survives_relabel_and_becomes_a_reference(labelled):
    sample = _busy_sample(labelled)
    gt = sample.ground_truth.detections[0]
    added = fo.Detection(label=gt.label, bounding_box=list(gt.bounding_box), mask=gt.mask.copy())
    sample.refseg.detections.append(added)
    sample.save()
    assert review.find_corrections(labelled, "refseg")["num_added"] == 1
    counts_before = core.bank_record(labelled, "default")["counts"]
    plain = core.update_memory_bank_from_review(labelled, bank_name="default", pred_field="refseg")
    assert plain["num_added"] == 0  # without corrected_tag a correction is not a reference
    # through the operator, as the App's form does ("corrected labels become references too")
    report = op("update_memory_bank_from_review")(labelled, bank_name="default", pred_field="refseg",
                                                  use_corrected=True)
    assert report["references_added"] == [{"class": gt.label, "count": 1}] and report["negatives_added"] == []
    assert report["counts"] != counts_before
    again = core.update_memory_bank_from_review(labelled, bank_name="default", pred_field="refseg",
                                                corrected_tag="corrected")
    assert again["num_added"] == 0 and again["already_in_bank"] == 1
    result = _relabel(labelled, existing="resume")  # the bank changed: every target is labelled again
    assert result["num_labelled"] == len(labelled.match_tags("reference", bool=False))
    sample.reload()
    kept = [d for d in sample.refseg.detections if d.id == added.id]
    assert len(kept) == 1 and np.array_equal(kept[0].mask, gt.mask)
    duplicates = [d for d in sample.refseg.detections if d.id != added.id and d.label == gt.label
                  and iou(detection_mask(d, H, W), detection_mask(added, H, W)) >= 0.5]
    assert duplicates == []


def test_merge_with_review_counts():
    def det(label, box, **kw):
        mask = np.ones((10, 10), bool)
        return fo.Detection(label=label, bounding_box=box, mask=mask, **kw)

    old = [det("a", [0.0, 0.0, 0.1, 0.1], tags=["rejected"]), det("a", [0.5, 0.5, 0.1, 0.1])]
    review.stamp(old[1:])  # the second is refseg's, untouched: replaced
    new = [det("a", [0.0, 0.0, 0.1, 0.1]), det("b", [0.0, 0.0, 0.1, 0.1]), det("a", [0.5, 0.5, 0.1, 0.1])]
    merged, counts = review.merge_with_review(old, new, 100, 100)
    assert counts == {"kept": 1, "new": 2, "dropped": 1}
    assert merged[0] is old[0] and merged[1] is new[1] and merged[2] is new[2]


def test_operators_find_corrections_and_remask_selected_labels(labelled):
    sample = _busy_sample(labelled)
    det = sample.refseg.detections[0]
    _shift_box(det, -0.01)
    sample.save()
    found = op("find_corrections")(labelled)
    assert (found["num_edited"], found["num_added"]) == (1, 0) and "1 edited" in found["summary"]
    other = sample.refseg.detections[2]
    remasked = op("remask_boxes")(labelled, only="selected", label_ids=[other.id])
    assert remasked["num_masks"] == 1
    sample.reload()
    assert [d.id for d in sample.refseg.detections if "corrected" in d.tags] == [det.id, other.id]


# ---------------------------------------------------------------------------- what the App's Annotate tab saves


def _app_painted(det, extra_rows: int, scale: int = 5):
    """A mask repainted the way FiftyOne 1.22.1's Annotate tab saves it (seen in the browser test): the whole
    mask re-drawn at the display resolution (``scale`` screen pixels per image pixel), ``uint8`` 0/1, with a
    stroke of ``extra_rows`` image rows painted below it, and the box refitted to the new extent."""
    x, y, w, h = det.bounding_box
    crop = np.asarray(det.mask, bool)
    grown = np.concatenate([crop, np.ones((extra_rows, crop.shape[1]), bool)])
    det.mask = np.kron(grown, np.ones((scale, scale), bool)).astype(np.uint8)
    det.bounding_box = [x, y, w, h + extra_rows / H]


def test_mask_painted_in_the_app_is_an_edit_and_remask_keeps_it(labelled):
    sample = _busy_sample(labelled)
    det = sample.refseg.detections[0]
    before = detection_mask(det, H, W)
    _app_painted(det, extra_rows=3)
    sample.save()
    sample.reload()
    det = sample.refseg.detections[0]
    painted = detection_mask(det, H, W)  # read back in image pixels, whatever the crop's resolution
    assert painted.shape == (H, W) and (painted & before).sum() == before.sum()
    assert painted.sum() == before.sum() + 3 * before.any(axis=0).sum()
    report = review.find_corrections(labelled, "refseg")
    assert (report["num_edited"], report["num_added"]) == (1, 0)
    assert review.is_corrected(det) and not review.needs_new_mask(det)
    # "new masks for corrected boxes" leaves a painted mask alone ...
    report = review.remask_boxes(labelled, label_field="refseg", only="corrected", bank_name="default")
    assert (report["num_masks"], report["num_kept"]) == (0, 1)
    sample.reload()
    assert np.array_equal(detection_mask(sample.refseg.detections[0], H, W), painted)
    # ... the selected-labels mode replaces it
    report = review.remask_boxes(labelled, label_field="refseg", only="selected", label_ids=[det.id],
                                 bank_name="default")
    assert report["num_masks"] == 1
    sample.reload()
    assert not np.array_equal(detection_mask(sample.refseg.detections[0], H, W), painted)


def test_remask_of_corrected_labels_prompts_the_boxes_without_a_fitting_mask(labelled):
    sample = _busy_sample(labelled)
    relabelled, unmasked, moved = sample.refseg.detections[:3]
    gt = sample.ground_truth.detections[0]
    relabelled.label = "blue" if relabelled.label != "blue" else "red"  # mask and box as refseg wrote them
    unmasked.mask = None  # the App's "Remove mask"
    _shift_box(moved, 0.02)  # a box moved in Python: its old mask no longer fits
    drawn_box = fo.Detection(label=gt.label, bounding_box=list(gt.bounding_box))  # the App's new box
    drawn_mask = fo.Detection(label=gt.label, bounding_box=list(gt.bounding_box), mask=gt.mask.copy())  # pen
    sample.refseg.detections.extend([drawn_box, drawn_mask])
    sample.save()
    found = review.find_corrections(labelled, "refseg")
    assert (found["num_edited"], found["num_added"]) == (3, 2)
    sample.reload()
    assert [review.needs_new_mask(d) for d in sample.refseg.detections if "corrected" in d.tags] == [
        False, True, True, True, False]
    report = review.remask_boxes(labelled, label_field="refseg", only="corrected", bank_name="default")
    assert (report["num_masks"], report["num_empty"], report["num_kept"]) == (3, 0, 2)
    sample.reload()
    dets = {d.id: d for d in sample.refseg.detections}
    assert dets[unmasked.id].mask is not None
    assert iou(detection_mask(dets[drawn_box.id], H, W), detection_mask(gt, H, W)) > 0.9
    assert np.array_equal(dets[drawn_mask.id].mask, gt.mask)
    # a remasked label is stamped again: run again, nothing to do; move its box, and it needs a new mask
    assert all(d[review.FINGERPRINT_ATTR] == review.fingerprint(d) for d in (dets[unmasked.id], dets[moved.id]))
    again = review.remask_boxes(labelled, label_field="refseg", only="corrected", bank_name="default")
    assert (again["num_masks"], again["num_kept"]) == (0, 5)
    _shift_box(dets[moved.id], -0.02)
    sample.save()
    assert review.remask_boxes(labelled, label_field="refseg", only="corrected", bank_name="default")[
        "num_masks"] == 1


def test_fingerprints_written_by_earlier_versions_still_tell_edits(labelled):
    sample = _busy_sample(labelled)
    for det in sample.refseg.detections:
        det[review.FINGERPRINT_ATTR] = review.fingerprint(det)[:16]  # the label-box-mask digest alone
    sample.save()
    assert review.find_corrections(labelled, "refseg")["num_edited"] == 0
    det = sample.refseg.detections[0]
    det.label = "blue" if det.label != "blue" else "red"
    sample.save()
    assert review.find_corrections(labelled, "refseg")["num_edited"] == 1
    sample.reload()
    assert review.needs_new_mask(sample.refseg.detections[0])  # which part changed is unknown: as before
    assert not review.needs_new_mask(sample.refseg.detections[1])
