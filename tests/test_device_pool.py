"""Several devices at once: two CPU workers must give what one process gives, in order, resumably."""

import json

import numpy as np
import pytest

from refseg import PAPER, Segmenter, load_image
from refseg.runtime.candidate_cache import CandidateCache
from refseg.runtime.device_pool import DevicePool, WorkerError, local_devices
from refseg.runtime.predict_job import run_prediction
from refseg.runtime.run_spec import RunSpec
from refseg.testing import ColorEncoder, ColorRegionProposer, coco_bank, make_synthetic_coco

SPEC = RunSpec(proposer="refseg.testing:ColorRegionProposer", encoder="refseg.testing:ColorEncoder", preset="paper",
               overrides="proposal.image_size=512", encoder_input_size=224)
CFG = SPEC.config()
assert CFG == PAPER.with_overrides(**{"proposal.image_size": 512})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pycocotools.coco import COCO

    root = tmp_path_factory.mktemp("pool")
    image_dir, json_path = make_synthetic_coco(root, n_images=9, seed=4)
    coco = COCO(str(json_path))
    bank = coco_bank(coco, image_dir, [1, 2], ColorEncoder(), ColorRegionProposer(), CFG)
    bank_path = bank.save(root / "bank.safetensors")
    targets = [(i, image_dir / coco.imgs[i]["file_name"]) for i in range(3, 10)]
    return bank_path, bank, targets


def test_two_workers_match_one_process_in_order(setup, tmp_path):
    bank_path, bank, targets = setup
    single = Segmenter(ColorRegionProposer(), ColorEncoder(), bank, CFG)
    expected = [single.predict(p) for _, p in targets]
    with DevicePool(SPEC, bank_path, ["cpu", "cpu"]) as pool:
        got = pool.predict_batch([load_image(p) for _, p in targets])
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert a.labels.tolist() == b.labels.tolist()
            np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
            assert np.array_equal(a.masks, b.masks)
        # the resumable runner drives the pool like a Segmenter; a rerun redoes nothing
        out = tmp_path / "results.json"
        run = run_prediction(pool, targets, out, batch_size=4, progress=False)
        assert run.n_processed == len(targets) and not run.failed
        again = run_prediction(pool, targets, out, batch_size=4, progress=False)
        assert again.n_processed == 0 and again.n_resumed == len(targets)
    # the same run as far as resuming goes: a single process continues what the pool started
    assert run_prediction(single, targets, out, batch_size=4, progress=False).n_resumed == len(targets)
    records = json.loads(out.read_text())
    per_image = [r["image_id"] for r in records]
    assert per_image == sorted(per_image)  # in input order, each image once
    assert sum(len(d) for d in expected) == len(records)


def test_worker_start_failure_is_reported(setup):
    bank_path, _, _ = setup
    bad = SPEC.with_changes(proposer="no_such_module:Thing")
    with pytest.raises(WorkerError, match=r"(?s)failed to start.*cannot import module .no_such_module."):
        DevicePool(bad, bank_path, ["cpu"])


def test_local_devices_parsing():
    assert local_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert local_devices("all")  # every GPU, or the CPU where there is none
    with pytest.raises(ValueError):
        local_devices(" , ")


def test_workers_share_a_candidate_cache(setup, tmp_path):
    """With candidate_dir the workers fill and read one cache: a rerun decodes no cached image and runs no
    network on it, an unreadable entry is recomputed by its worker, and the labels never change."""
    bank_path, bank, targets = setup
    single = Segmenter(ColorRegionProposer(), ColorEncoder(), bank, CFG)
    # run_prediction writes COCO boxes by the config's rule (the paper preset's: one pixel short)
    expected = json.loads(json.dumps([single.predict(p).to_coco(i, paper_box=CFG.output.paper_box)
                                      for i, p in targets]))
    with DevicePool(SPEC, bank_path, ["cpu", "cpu"], candidate_dir=tmp_path / "candidates") as pool:
        cache = pool.cache
        assert cache is not None and cache.root.parent == tmp_path / "candidates"
        first = run_prediction(pool, targets, tmp_path / "first.json", batch_size=4, progress=False, cache=cache)
        assert first.n_processed == len(targets) and cache.stats["writes"] == len(targets) and len(cache) == 7
        assert cache.stats["hits"] == 0

        # a hit is sent as a key and a path, not as pixels: the main process decodes nothing
        prepared = pool.prepare(targets[0][1], cache)
        assert prepared.rgb is None and prepared.key in cache

        # one entry becomes unreadable: its worker decodes that image and labels it from the networks
        cache.path_for(cache.key_of(targets[2][1])).write_bytes(b"not a zip")
        second = run_prediction(pool, targets, tmp_path / "second.json", batch_size=4, progress=False, cache=cache)
        assert second.n_processed == len(targets)
        assert cache.stats["hits"] == len(targets) - 1 and cache.stats["corrupt"] == 1
        assert cache.stats["writes"] == len(targets) + 1
        flat = [r for rs in expected for r in rs]
        for out in ("first.json", "second.json"):
            got = json.loads((tmp_path / out).read_text())
            assert [(r["image_id"], r["category_id"], r["bbox"], r["segmentation"]) for r in got] == \
                [(r["image_id"], r["category_id"], r["bbox"], r["segmentation"]) for r in flat]
            np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in flat], atol=1e-6)

        with pytest.raises(ValueError, match="its own"):
            pool.prepare(targets[0][1], CandidateCache(tmp_path / "elsewhere"))
    with DevicePool(SPEC, bank_path, ["cpu"]) as plain, pytest.raises(ValueError, match="its own"):
        plain.label_prepared([], cache)


def test_results_cross_the_pipe_as_tight_crops():
    import pickle

    from refseg.runtime.device_pool import _pack, _unpack
    from refseg.method.results import CompactMasks, Detections

    rng = np.random.default_rng(0)
    masks = np.zeros((4, 60, 80), bool)
    masks[0, 10:20, 30:35] = rng.random((10, 5)) > 0.3
    masks[2] = rng.random((60, 80)) > 0.5  # touches every border
    masks[3, 59, 79] = True  # one corner pixel; mask 1 stays empty
    scores, labels = np.array([0.9, 0.8, 0.7, 0.6]), np.array([0, 1, 0, 1])
    dense = Detections.from_masks(masks, scores, labels, ["a", "b"], pred_iou=np.full(4, 0.5))
    # as the pipeline makes them: masks given in (loose) windows, never as full arrays
    windows = [[25, 5, 40, 25], [0, 0, 0, 0], [0, 0, 80, 60], [70, 50, 80, 60]]
    crops = [masks[i, y1:y2, x1:x2] if x2 > x1 else None for i, (x1, y1, x2, y2) in enumerate(windows)]
    compact = Detections.from_crops((60, 80), windows, crops, scores, labels, ["a", "b"], pred_iou=np.full(4, 0.5),
                                    candidate_index=np.array([5, 0, 2, 9]))
    for dets in (dense, compact):
        packed = _pack(dets)
        assert isinstance(packed["masks"], CompactMasks) and packed["masks"] is dets.compact  # reused, not re-derived
        wire = pickle.dumps(packed)
        assert len(wire) < masks.size // 8 + 2000  # the crops' bits, not the whole masks' bytes
        back = _unpack(pickle.loads(wire))
        assert back._masks is None  # full masks only when asked for
        assert np.array_equal(back.masks, masks) and back.masks.dtype == bool
        assert np.array_equal(back.boxes, dense.boxes) and back.labels.tolist() == [0, 1, 0, 1]
        assert back.boxes.tolist() == [[30, 10, 35, 20], [0, 0, 0, 0], [0, 0, 80, 60], [79, 59, 80, 60]]
        assert (back.candidate_index is None if dets is dense else back.candidate_index.tolist() == [5, 0, 2, 9])
    assert compact._masks is None  # packing compact detections made no full mask
