"""Several devices at once: two CPU workers must give what one process gives, in order, resumably."""

import json

import numpy as np
import pytest

from refseg import PAPER, Segmenter, load_image
from refseg.device_pool import DevicePool, SegmenterSpec, WorkerError, local_devices
from refseg.predict_job import run_prediction
from refseg.testing import ColorEncoder, ColorRegionProposer, make_synthetic_coco

CFG = PAPER.with_overrides(**{"proposal.image_size": 512})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from refseg import Reference, ReferenceEncoder, decode_rle
    from pycocotools.coco import COCO

    root = tmp_path_factory.mktemp("pool")
    image_dir, json_path = make_synthetic_coco(root, n_images=9, seed=4)
    coco = COCO(str(json_path))
    refs = [Reference(load_image(image_dir / coco.imgs[a["image_id"]]["file_name"]), coco.cats[a["category_id"]]["name"],
                      mask=decode_rle(a["segmentation"])) for a in coco.loadAnns(coco.getAnnIds(imgIds=[1, 2]))]
    bank, _ = ReferenceEncoder(ColorEncoder(), CFG.reference, ColorRegionProposer(), 512).build_bank(refs)
    bank_path = bank.save(root / "bank.safetensors")
    spec = SegmenterSpec(proposer="refseg.testing:ColorRegionProposer", encoder="refseg.testing:ColorEncoder",
                         bank_path=str(bank_path), config=CFG.to_dict(), encoder_input_size=224)
    targets = [(i, image_dir / coco.imgs[i]["file_name"]) for i in range(3, 10)]
    return spec, bank, targets


def test_two_workers_match_one_process_in_order(setup, tmp_path):
    spec, bank, targets = setup
    single = Segmenter(ColorRegionProposer(), ColorEncoder(), bank, CFG)
    expected = [single.predict(p) for _, p in targets]
    with DevicePool(spec, ["cpu", "cpu"]) as pool:
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
    spec, _, _ = setup
    bad = SegmenterSpec(proposer="no_such_module:Thing", encoder=spec.encoder, bank_path=spec.bank_path,
                        config=spec.config)
    with pytest.raises(WorkerError, match=r"(?s)failed to start.*cannot import module .no_such_module."):
        DevicePool(bad, ["cpu"])


def test_local_devices_parsing():
    assert local_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert local_devices("all")  # every GPU, or the CPU where there is none
    with pytest.raises(ValueError):
        local_devices(" , ")
