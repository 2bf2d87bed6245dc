"""Bad input gives one clear error naming the item, and the good items are still processed (issue 10).

Huge images are faked with a real header declaring a huge size and almost no data,
so nothing big is ever allocated.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from refseg import BankError, ImageLoadError, MemoryBank, load_image
from refseg.cli import main
from refseg.io.coco import box_prompts, evaluate, load_references, read_coco, read_results, target_images
from refseg.method.config import DEFAULT, PRESETS, MergeConfig, PipelineConfig, ProposalConfig
from refseg.io.images import MAX_PIXELS_ENV, LargeImageWarning, image_size, max_image_pixels
from refseg.method.references import Reference, ReferenceEncoder, box_problem
from refseg.testing import PALETTE, ColorEncoder, make_synthetic_coco

TOY = ["--encoder", "refseg.testing:ColorEncoder", "--device", "cpu", "--set", "proposal.image_size=256"]
PROPOSER = ["--proposer", "refseg.testing:ColorRegionProposer"]


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height RGB pixels, with a single tiny data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                     + chunk(b"IEND", b""))
    return path


def jpeg_header(path: Path, width: int, height: int) -> Path:
    """A small real JPEG whose frame header (SOF0) is rewritten to declare width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, format="JPEG")
    raw = bytearray(buf.getvalue())
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(raw))
    return path


def small_png(path: Path, h: int = 30, w: int = 40) -> Path:
    arr = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def bomb_warnings_without(records, name: str) -> list[str]:
    return [str(w.message) for w in records
            if issubclass(w.category, Image.DecompressionBombWarning) and name not in str(w.message)]


# ---------------------------------------------------------------------------- images: pixel limit, empty files


def test_image_over_the_pixel_limit_is_a_load_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    pil_limit = Image.MAX_IMAGE_PIXELS
    assert max_image_pixels() == 2 * pil_limit  # the default is PIL's hard limit
    for path in (png_header(tmp_path / "huge.png", 14000, 13000), jpeg_header(tmp_path / "huge.jpg", 14000, 13000)):
        with pytest.raises(ImageLoadError, match=rf"{path.name}: it is 14000x13000 = 182,000,000 pixels, over the "
                                                 rf"limit of 178,956,970 \(set {MAX_PIXELS_ENV}"):
            load_image(path)
        with pytest.raises(ImageLoadError, match=path.name):
            image_size(path)
    assert Image.MAX_IMAGE_PIXELS == pil_limit


def test_large_image_warning_names_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    # 100 MP: over PIL's warning limit, under its error; image_size reads a JPEG's header only
    path = jpeg_header(tmp_path / "large.jpg", 10000, 10000)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        assert image_size(path) == (10000, 10000)
    ours = [w for w in records if issubclass(w.category, LargeImageWarning)]
    assert len(ours) == 1 and "large.jpg: large image, 10000x10000" in str(ours[0].message)
    assert issubclass(LargeImageWarning, Image.DecompressionBombWarning)  # filters on PIL's warning still apply
    assert not bomb_warnings_without(records, "large.jpg")  # PIL's own warning (no file name) is not shown


def test_pixel_limit_setting(tmp_path, monkeypatch):
    path = small_png(tmp_path / "small.png")  # 1200 pixels
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = load_image(path)
    with Image.open(path) as im:
        assert np.array_equal(want, np.asarray(im.convert("RGB")))  # under the limit: PIL's full decode

    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")
    with pytest.raises(ImageLoadError, match=r"small.png: it is 40x30 = 1,200 pixels, over the limit of 1,000"):
        load_image(path)
    assert np.array_equal(load_image(path, max_pixels=None), want)  # the argument wins over the setting
    monkeypatch.setenv(MAX_PIXELS_ENV, "2_000")
    with pytest.warns(LargeImageWarning, match="small.png"):
        assert np.array_equal(load_image(path), want)  # over half the limit: read, with a warning
    with pytest.raises(ImageLoadError, match="over the limit of 1,199"):
        load_image(path, max_pixels=1199)
    monkeypatch.setenv(MAX_PIXELS_ENV, "none")
    assert max_image_pixels() is None
    for bad in ("abc", "-5", "0", "1.5"):
        monkeypatch.setenv(MAX_PIXELS_ENV, bad)
        with pytest.raises(ValueError, match=MAX_PIXELS_ENV):
            load_image(path)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(path, max_pixels=0)


def test_a_limit_above_pils_own_is_honoured(tmp_path, monkeypatch):
    path = jpeg_header(tmp_path / "huge.jpg", 14000, 13000)
    monkeypatch.setenv(MAX_PIXELS_ENV, "400000000")
    pil_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert image_size(path) == (13000, 14000)  # header only: nothing decoded
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # PIL's limit lifted for that call only
    monkeypatch.setenv(MAX_PIXELS_ENV, "none")
    assert image_size(path) == (13000, 14000)


def test_empty_file_says_so(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty.jpg: empty file \(0 bytes\)"):
        load_image(empty)
    with pytest.raises(ImageLoadError, match="empty.jpg: empty file"):
        image_size(empty)


def test_bad_reference_images_are_skipped_naming_them_and_the_others_used(tmp_path, monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    small_png(tmp_path / "ok.png")
    png_header(tmp_path / "huge.png", 14000, 13000)
    (tmp_path / "empty.png").write_bytes(b"")
    images = [("ok.png", 40, 30), ("huge.png", 14000, 13000), ("empty.png", 40, 30)]
    coco = {"images": [{"id": i + 1, "file_name": f, "width": w, "height": h} for i, (f, w, h) in enumerate(images)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 10, 10],
                             "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]} for i in range(3)],
            "categories": [{"id": 1, "name": "thing"}]}
    refs = load_references(coco, tmp_path)
    assert [r.source["image"] for r in refs] == ["ok.png"]
    reasons = {s["image"]: reason for s, _, reason in refs.skipped}
    assert "huge.png" in reasons["huge.png"] and "over the limit" in reasons["huge.png"]
    assert "empty.png: empty file" in reasons["empty.png"]


def test_predict_records_a_huge_image_as_failed_and_labels_the_others(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    train_images, train_json = make_synthetic_coco(tmp_path / "train", n_images=3, seed=1)
    val_images, _ = make_synthetic_coco(tmp_path / "val", n_images=2, seed=2)
    png_header(val_images / "zz_huge.png", 14000, 13000)
    (val_images / "zz_empty.png").write_bytes(b"")
    bank = tmp_path / "bank.safetensors"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["build-bank", "--references", str(train_json), "--images", str(train_images), "--out", str(bank),
                     *PROPOSER, *TOY]) == 0
    capsys.readouterr()
    out = tmp_path / "results.json"
    assert main(["predict", "--bank", str(bank), "--images", str(val_images), "--out", str(out), "--quiet",
                 *PROPOSER, *TOY]) == 3  # finished, two images failed
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "zz_huge.png" in text and "over the limit" in text and "zz_empty.png" in text and "empty file" in text
    images = {d["id"]: d["file_name"] for d in json.loads((tmp_path / "results.images.json").read_text())}
    labelled = {images[r["image_id"]] for r in json.loads(out.read_text())}
    assert labelled == {p.name for p in val_images.glob("*.png")} - {"zz_huge.png", "zz_empty.png"}


# ---------------------------------------------------------------------------- COCO files


def _coco() -> dict:
    return {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                       {"id": 2, "file_name": "b.png", "width": 40, "height": 30}],
            "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
                            {"id": 11, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]}],
            "categories": [{"id": 1, "name": "thing"}]}


def _broken(change) -> dict:
    data = _coco()
    change(data)
    return data


BROKEN = {
    "annotation without category_id": (lambda d: d["annotations"][1].pop("category_id"),
                                       r"annotations\[1\] \(id 11\) has no 'category_id'"),
    "non-integer category_id": (lambda d: d["annotations"][1].update(category_id="thing"),
                                r"annotations\[1\] \(id 11\) has a non-integer category_id 'thing'"),
    "annotation without image_id": (lambda d: d["annotations"][0].pop("image_id"),
                                    r"annotations\[0\] \(id 10\) has no 'image_id'"),
    "null annotation": (lambda d: d["annotations"].insert(1, None), r"annotations\[1\] is null"),
    "bad bbox": (lambda d: d["annotations"][0].update(bbox=[1, "x", 2, 3]), r"annotations\[0\] \(id 10\) has a bbox"),
    "image without id": (lambda d: d["images"][1].pop("id"), r"images\[1\] \(file_name 'b.png'\) has no 'id'"),
    "null image": (lambda d: d["images"].append(None), r"images\[2\] is null"),
    "duplicate image ids": (lambda d: d["images"].append({"id": 2, "file_name": "c.png"}),
                            r"duplicate image id\(s\) 2"),
    "category without name": (lambda d: d["categories"][0].pop("name"), r"category 1 \(categories\[0\]\) has no 'name'"),
    "category without id": (lambda d: d["categories"][0].pop("id"), r"categories\[0\] \(name 'thing'\) has no 'id'"),
    "bad width": (lambda d: d["images"][0].update(width="wide"), r"image 1 .* width that is not a positive integer"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_malformed_coco_records_are_named(case, tmp_path):
    change, message = BROKEN[case]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_broken(change)))
    with pytest.raises(ValueError, match=rf"bad.json: {message}"):
        read_coco(path)
    with pytest.raises(ValueError, match=message):
        read_coco(_broken(change))


def test_targets_need_file_names_but_not_categories(tmp_path):
    data = _coco()
    data.pop("categories")
    assert read_coco(data) is data and target_images(data) == [(1, "a.png"), (2, "b.png")]
    data["images"][1].pop("file_name")
    read_coco(data)  # only the references of that image are unusable
    with pytest.raises(ValueError, match=r"image 2 \(images\[1\]\) has no 'file_name'"):
        target_images(data)


def test_malformed_results_records_are_named(tmp_path):
    good = {"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.9}
    assert read_results([good]) == [good]
    for record, message in (({**good, "score": None}, r"detection \[1\] has a score"),
                            ({k: v for k, v in good.items() if k != "image_id"}, r"detection \[1\] has no 'image_id'"),
                            (None, r"detection \[1\] is null")):
        path = tmp_path / "results.json"
        path.write_text(json.dumps([good, record]))
        with pytest.raises(ValueError, match=rf"results.json: {message}"):
            read_results(path)
        with pytest.raises(ValueError, match=message):
            evaluate(_coco(), [good, record], verbose=False)


@pytest.mark.parametrize("command", ["sample", "build-bank", "evaluate", "predict"])
def test_cli_reports_malformed_coco_files_in_one_line(command, tmp_path, capsys):
    data = _coco()
    data["annotations"][1].pop("category_id")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    results = tmp_path / "results.json"
    results.write_text("[]")
    bank = tmp_path / "bank.safetensors"
    b = MemoryBank({"name": "refseg.testing:ColorEncoder", "dim": 6})
    b.add("thing", torch.ones(6))
    b.save(bank)
    argv = {"sample": ["sample", "--coco", str(bad), "--shots", "1", "--out", str(tmp_path / "refs.json")],
            "build-bank": ["build-bank", "--references", str(bad), "--images", str(tmp_path), "--out", str(bank),
                           *TOY],
            "evaluate": ["evaluate", "--gt", str(bad), "--results", str(results)],
            "predict": ["predict", "--bank", str(bank), "--coco", str(bad), "--images", str(tmp_path),
                        "--out", str(results), *TOY]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.json: annotations[1] (id 11) has no 'category_id'" in err[0]


# ---------------------------------------------------------------------------- memory bank integrity

SETTINGS = {"name": "dinov2_vitl14", "input_size": 518, "patch_size": 14, "dim": 4}


def _bank() -> MemoryBank:
    bank = MemoryBank(SETTINGS)
    bank.add("cat", torch.tensor([1.0, 2.0, 3.0, 4.0]), id="r1")
    bank.add("dog", torch.tensor([0.5, 0, 2.0, 0]), id="r2")
    return bank


def _data_region(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:8 + n])["embeddings"]["data_offsets"]
    return 8 + n + start, 8 + n + end


def test_damaged_embeddings_are_refused_naming_the_file(tmp_path):
    path = _bank().save(tmp_path / "bank.safetensors")
    assert MemoryBank.load(path).counts() == {"cat": 1, "dog": 1}
    start, end = _data_region(path)
    raw = bytearray(path.read_bytes())
    raw[start + 5] ^= 0x5A  # a few flipped bits in the tensor data
    raw[end - 1] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(BankError, match=r"memory bank .*bank.safetensors is damaged: checksum mismatch.*rebuild it"):
        MemoryBank.load(path)


def test_non_finite_embeddings_are_refused(tmp_path):
    bank = _bank()
    bank._embeddings[1] = torch.tensor([0.0, float("nan"), 1.0, 0.0])  # bypasses add()'s check
    path = bank.save(tmp_path / "nan.safetensors")
    with pytest.raises(BankError, match=r"nan.safetensors is damaged: 1 embedding\(s\) hold NaN .*r2 \(dog\)"):
        MemoryBank.load(path)


def test_banks_written_before_the_checksum_still_load(tmp_path):
    header = {"format_version": 1, "class_names": ["cat"], "encoder": SETTINGS,
              "references": [{"id": "r1", "class": "cat", "negative": False, "source": {}}]}
    old = tmp_path / "old.safetensors"
    save_file({"embeddings": torch.tensor([[1.0, 0, 0, 0]])}, str(old), metadata={"refseg": json.dumps(header)})
    assert MemoryBank.load(old, SETTINGS).counts() == {"cat": 1}
    save_file({"embeddings": torch.tensor([[float("inf"), 0, 0, 0]])}, str(old), metadata={"refseg": json.dumps(header)})
    with pytest.raises(BankError, match="old.safetensors is damaged"):  # finiteness is still checked
        MemoryBank.load(old)
    bad_header = tmp_path / "badheader.safetensors"
    save_file({"embeddings": torch.zeros(1, 4)}, str(bad_header), metadata={"refseg": "{not json"})
    with pytest.raises(BankError, match="badheader.safetensors is damaged: its header is not valid JSON"):
        MemoryBank.load(bad_header)


def test_cli_refuses_a_damaged_bank(tmp_path, capsys):
    path = _bank().save(tmp_path / "bank.safetensors")
    start, _ = _data_region(path)
    raw = bytearray(path.read_bytes())
    raw[start] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert main(["predict", "--bank", str(path), "--images", str(tmp_path), "--out", str(tmp_path / "r.json"),
                 *PROPOSER, *TOY]) == 2
    assert "is damaged: checksum mismatch" in capsys.readouterr().err


# ---------------------------------------------------------------------------- settings


@pytest.mark.parametrize("key,value,message", [
    ("merge.top_k", -5, r"merge.top_k must be a positive integer \(>= 1\), got -5"),
    ("merge.top_k", "abc", r"merge.top_k must be a positive integer \(>= 1\), got 'abc'"),
    ("merge.top_k", 2.5, "merge.top_k must be a positive integer"),
    ("merge.max_after_nms", 0, "merge.max_after_nms must be a positive integer"),
    ("merge.nms_iou", 1.5, r"merge.nms_iou must be a number in \[0, 1\]"),
    ("merge.nms_iou", "high", r"merge.nms_iou must be a number in \[0, 1\] \(IoU\), got 'high'"),
    ("merge.merge_resolution", 0, "merge.merge_resolution must be null or a positive integer"),
    ("merge.merge_resolution", "abc", "merge.merge_resolution must be null or a positive integer, got 'abc'"),
    ("merge.score_threshold", float("nan"), "merge.score_threshold must be a finite number"),
    ("merge.soft_merge", "maybe", "merge.soft_merge must be true or false, got 'maybe'"),
    ("proposal.points_per_side", 0, "proposal.points_per_side must be a positive integer"),
    ("proposal.image_size", -1024, "proposal.image_size must be a positive integer"),
    ("proposal.prompt_batch_size", "many", "proposal.prompt_batch_size must be a positive integer"),
    ("proposal.pred_iou_threshold", 40, r"proposal.pred_iou_threshold must be a number <= 1"),
    ("reference.context_scale", 0, "reference.context_scale must be a number > 0"),
    ("reference.min_mask_weight", -1e-3, "reference.min_mask_weight must be a number >= 0"),
    ("precision", "fp8", "precision must be one of fp32, bf16, fp16, got 'fp8'"),
])
def test_settings_out_of_range_are_refused_naming_them(key, value, message):
    with pytest.raises(ValueError, match=message):
        DEFAULT.with_overrides(**{key: value})


def test_settings_in_range_and_text_values_are_accepted():
    for preset in PRESETS.values():
        assert PipelineConfig.from_dict(preset.to_dict()) == preset
    cfg = DEFAULT.with_overrides(**{"merge.top_k": "50", "merge.soft_merge": "off", "merge.merge_resolution": "128",
                                    "merge.nms_iou": "1", "proposal.pred_iou_threshold": -1.0,
                                    "merge.score_threshold": 0})
    assert (cfg.merge.top_k, cfg.merge.soft_merge, cfg.merge.merge_resolution, cfg.merge.nms_iou) == (50, False, 128, 1.0)
    assert cfg.with_overrides(**{"merge.merge_resolution": None}).merge.merge_resolution is None
    assert PRESETS["fast"].with_overrides(**{"merge.merge_resolution": "none"}).merge.merge_resolution is None
    with pytest.raises(ValueError, match="merge.top_k"):
        MergeConfig(top_k=0)
    with pytest.raises(ValueError, match="proposal.points_per_side"):
        PipelineConfig.from_dict({**DEFAULT.to_dict(), "proposal": {**DEFAULT.to_dict()["proposal"],
                                                                     "points_per_side": -1}})
    assert ProposalConfig(pred_iou_threshold=1.0).pred_iou_threshold == 1.0  # keeps nothing, but allowed


def test_cli_refuses_out_of_range_settings(tmp_path, capsys):
    for value in ("-5", "abc"):
        assert main(["predict", "--bank", str(_bank().save(tmp_path / "b.safetensors")), "--images", str(tmp_path),
                     "--out", str(tmp_path / "r.json"), "--set", f"merge.top_k={value}", *PROPOSER, *TOY]) == 2
        assert "bad --set: setting merge.top_k must be a positive integer" in capsys.readouterr().err


# ---------------------------------------------------------------------------- box-only references


class NoProposer:
    """Fails the test if asked for a mask: box checks must come first."""

    device = torch.device("cpu")
    calls = 0

    def masks_from_boxes(self, image, boxes):
        NoProposer.calls += 1
        raise AssertionError("the proposal model was asked for a mask from an unusable box")


def test_unusable_boxes_are_reported_before_the_proposal_model_is_asked():
    img = np.full((40, 40, 3), PALETTE["background"], np.uint8)
    good = np.zeros((40, 40), bool)
    good[10:30, 10:30] = True
    refs = [Reference(img, "a", box=(10, 10, 10, 30), source={"id": 1}),  # zero width
            Reference(img, "b", box=(20, 20, 5, 30), source={"id": 2}),  # negative width
            Reference(img, "c", box=(50, 50, 60, 60), source={"id": 3}),  # outside the 40x40 image
            Reference(img, "d", box=(0, float("nan"), 5, 5), source={"id": 4}),
            Reference(img, "e", mask=good, source={"id": 5})]
    encoder = ReferenceEncoder(ColorEncoder(input_size=56, patch_size=14), proposer=NoProposer(),
                               proposal_image_size=64)
    bank, report = encoder.build_bank(refs)
    assert NoProposer.calls == 0 and report.used == {"e": 1}
    reasons = {src["id"]: reason for src, _, reason in report.skipped}
    assert "zero or negative area (0 wide, 20 high)" in reasons[1] and reasons[1].startswith("unusable box")
    assert "zero or negative area (-15 wide" in reasons[2]
    assert "outside the 40x40 image" in reasons[3] and "non-finite" in reasons[4]
    assert box_problem((0, 0, 5, 5), 40, 40) is None and box_problem((-5, -5, 1, 1), 40, 40) is None


def test_coco_box_prompts_and_skip_reasons(tmp_path):
    small_png(tmp_path / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10]},  # zero width
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [45, 5, 10, 10]},  # right of the image
                            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10]},  # fine
                            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10],
                             "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]}],  # has a mask
            "categories": [{"id": 1, "name": "thing"}]}
    assert [a["id"] for a in box_prompts(data)] == [3]  # the only one that needs the proposal model
    refs = load_references(data, tmp_path)
    assert [r.source["annotation_id"] for r in refs] == [3, 4]
    reasons = {s["annotation_id"]: reason for s, _, reason in refs.skipped}
    assert "zero or negative area" in reasons[1] and "outside the 40x30 image" in reasons[2]
