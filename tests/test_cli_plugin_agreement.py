"""The two front ends agree: the same COCO references give the same memory bank through ``refseg
build-bank`` and the plugin's ``build_memory_bank``, and the same bank gives the same detections and boxes
through ``refseg predict`` and the plugin's ``auto_label``; only ``refseg predict --preset paper`` writes the
reference's one-pixel-short COCO boxes.

The image width (259) and height (211) are chosen so that FiftyOne's relative coordinates do not multiply back
to the integer pixels (223 / 259 * 259 = 222.99999999999997): reference box corners taken naively from them
would be truncated a pixel short of the CLI's. Non-integer COCO boxes (quarters and tenths, some whose
``x + w`` is an integer) are included, and one box-only reference (its box is a SAM2-style box prompt).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

fo = pytest.importorskip("fiftyone")
import refseg_fiftyone.convert  # noqa: E402
import refseg_fiftyone.core  # noqa: E402
import fiftyone.utils.coco as fouc  # noqa: E402

from refseg import MemoryBank  # noqa: E402
from refseg.cli import main  # noqa: E402
from refseg.method.results import decode_rle, encode_rle  # noqa: E402
from refseg.testing import CLASSES, PALETTE, draw_scene  # noqa: E402
from test_fiftyone_plugin import TOY, op, unique  # noqa: E402

HEIGHT, WIDTH = 211, 259
CLI_TOY = ["--proposer", TOY["proposer"], "--encoder", TOY["encoder"], "--device", "cpu",
           "--set", TOY["overrides"]]
# bbox variants (x, y, w, h) around a mask's extent (x1, y1, x2, y2), exclusive; each still contains the mask
# after FiftyOne's importer crops the mask to the rounded box. The flag: the variant's corners can sit where a
# naive conversion goes wrong (integers or halves); the shapes are then placed where it does.
VARIANTS = (
    (True, lambda x1, y1, x2, y2: (x1, y1, x2 - x1, y2 - y1)),  # the exact integer box
    (True, lambda x1, y1, x2, y2: (x1 - 0.75, y1 - 0.75, x2 - x1 + 1.75, y2 - y1 + 1.75)),  # x + w an integer
    (True, lambda x1, y1, x2, y2: (x1 - 0.5, y1 - 0.5, x2 - x1 + 1.0, y2 - y1 + 1.0)),  # halves: rounding ties
    (False, lambda x1, y1, x2, y2: (x1 - 0.25, y1 - 0.25, x2 - x1 + 0.5, y2 - y1 + 0.5)),  # quarters
    (False, lambda x1, y1, x2, y2: (x1 - 0.3, y1 - 0.2, x2 - x1 + 0.6, y2 - y1 + 0.7)),  # tenths
)


def _naive_misses(bbox) -> int:
    """Corners of a COCO box that a conversion from what FiftyOne's importer stores (``relative * size``) gets
    wrong when truncated (reference boxes) or rounded (where the importer placed the mask crop)."""
    x, y, w, h = bbox
    rx, ry, rw, rh = x / WIDTH, y / HEIGHT, w / WIDTH, h / HEIGHT
    naive = (rx * WIDTH, ry * HEIGHT, (rx + rw) * WIDTH, (ry + rh) * HEIGHT)
    true = (x, y, x + w, y + h)
    return sum(int(a) != int(b) or round(a) != round(b) for a, b in zip(naive, true))


def _reference_scene(rng, variant_of) -> tuple[np.ndarray, list[tuple[str, np.ndarray, tuple]]]:
    """One image of four shapes (one per quadrant, so they never touch), each placed where its COCO box
    trips the naive conversion: [(class, mask, bbox)]."""
    image = np.clip(np.array(PALETTE["background"], np.float32) + rng.normal(0, 6, (HEIGHT, WIDTH, 3)), 0, 255)
    out = []
    for q, (cx, cy) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        left, top = cx * (WIDTH // 2) + 2, cy * (HEIGHT // 2) + 2
        right, bottom = left + WIDTH // 2 - 4, top + HEIGHT // 2 - 4
        name = CLASSES[int(rng.integers(len(CLASSES)))]
        tricky, variant = variant_of(len(out))
        for _attempt in range(500):
            x1, y1 = int(rng.integers(left, right - 40)), int(rng.integers(top, bottom - 40))
            x2, y2 = int(rng.integers(x1 + 36, right + 1)), int(rng.integers(y1 + 36, bottom + 1))
            layer = Image.new("L", (WIDTH, HEIGHT), 0)
            shape = ImageDraw.Draw(layer).ellipse if rng.random() < 0.5 else ImageDraw.Draw(layer).rectangle
            shape([x1, y1, x2 - 1, y2 - 1], fill=255)
            mask = np.asarray(layer) > 0
            ys, xs = np.nonzero(mask)
            bbox = tuple(float(v) for v in variant(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
            if not tricky or _naive_misses(bbox):
                break
        else:
            raise AssertionError("no tricky box found")
        image[mask] = np.clip(np.array(PALETTE[name], np.float32) + rng.normal(0, 6, (int(mask.sum()), 3)), 0, 255)
        out.append((name, mask, bbox))
    return image.astype(np.uint8), out


def _write_set(root: Path, n_images: int, seed: int, references: bool) -> tuple[Path, Path]:
    """PNG images of WIDTH x HEIGHT and a COCO file (RLE masks) of the object classes: reference scenes
    with tricky boxes of every variant, or random target scenes."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]
    cat_ids = {c["name"]: c["id"] for c in categories}
    coco = {"images": [], "annotations": [], "categories": categories}
    for i in range(n_images):
        if references:
            image, instances = _reference_scene(rng, lambda k: VARIANTS[(len(coco["annotations"]) + k) % len(VARIANTS)])
        else:
            image, drawn = draw_scene(rng, HEIGHT, WIDTH, 5)
            instances = []
            for inst in drawn:
                ys, xs = np.nonzero(inst["mask"])
                bbox = VARIANTS[0][1](int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
                instances.append((inst["class_name"], inst["mask"], tuple(float(v) for v in bbox)))
        name = f"scene_{i:03d}.png"
        Image.fromarray(image).save(images / name)
        coco["images"].append({"id": i + 1, "file_name": name, "height": HEIGHT, "width": WIDTH})
        for class_name, mask, bbox in instances:
            if class_name not in cat_ids:
                continue
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1,
                                        "category_id": cat_ids[class_name], "segmentation": encode_rle(mask),
                                        "area": int(mask.sum()), "bbox": list(bbox), "iscrowd": 0})
    path = root / "annotations.json"
    path.write_text(json.dumps(coco))
    return images, path


def _cli(*args: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(list(args)) == 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("agree")
    ref_images, ref_json = _write_set(root / "refs", n_images=4, seed=5, references=True)
    coco = json.loads(ref_json.read_text())
    box_only = coco["annotations"][1]  # no mask (its x + w is an integer): the proposer's box prompt makes it
    del box_only["segmentation"]
    ref_json.write_text(json.dumps(coco))
    target_images, _ = _write_set(root / "targets", n_images=4, seed=6, references=False)

    cli_bank = root / "cli_bank.safetensors"
    _cli("build-bank", "--references", str(ref_json), "--images", str(ref_images), "--out", str(cli_bank),
         "--input-size", str(TOY["encoder_input_size"]), "--batch-size", "1", *CLI_TOY)

    # the same file through FiftyOne's own COCO importer, the way a user brings references into FiftyOne
    dataset = fo.Dataset.from_dir(dataset_type=fo.types.COCODetectionDataset, data_path=str(ref_images),
                                  labels_path=str(ref_json), label_types="segmentations", label_field="ground_truth",
                                  include_annotation_id=True, name=unique("agree"))
    # FiftyOne's segmentation import leaves box-only annotations out: add that one its importer's way
    file_name = coco["images"][box_only["image_id"] - 1]["file_name"]
    sample = dataset.match(fo.ViewField("filepath").ends_with(file_name)).first()
    det = fouc.COCOObject.from_anno_dict(box_only).to_detection(
        (WIDTH, HEIGHT), classes_map={c["id"]: c["name"] for c in coco["categories"]}, include_id=True)  # its coco_id
    assert det.mask is None
    sample.ground_truth.detections.append(det)  # in annotation order, as the CLI reads them (prototype sums)
    sample.ground_truth.detections.sort(key=lambda d: d.coco_id)
    sample.save()
    dataset.tag_samples("reference")
    dataset.add_samples([fo.Sample(filepath=str(p)) for p in sorted(target_images.glob("*.png"))])
    op("build_memory_bank")(dataset, label_field="ground_truth", bank_name="agree", batch_size=1, **TOY)
    yield {"root": root, "coco": coco, "cli_bank": cli_bank, "dataset": dataset, "targets": target_images}
    dataset.delete()


def test_same_references_give_the_same_bank_through_the_cli_and_the_plugin(setup):
    coco, dataset = setup["coco"], setup["dataset"]
    cli = MemoryBank.load(setup["cli_bank"])
    plugin = MemoryBank.load(dataset.info["refseg_banks"]["agree"]["path"])
    assert len(cli) == len(plugin) == len(coco["annotations"])

    # the plugin's entries name FiftyOne labels; the importer kept each one's COCO id (coco_id)
    coco_id = {d.id: d.coco_id for s in dataset.match_tags("reference") for d in s.ground_truth.detections}
    cli_emb, plugin_emb = cli.embeddings()[0], plugin.embeddings()[0]  # rows in entry order (all positive)
    by_annotation_cli = {e.source["annotation_id"]: (e.class_name, cli_emb[i]) for i, e in enumerate(cli.entries)}
    by_annotation_plugin = {coco_id[e.source["label_id"]]: (e.class_name, plugin_emb[i])
                            for i, e in enumerate(plugin.entries)}
    assert by_annotation_cli.keys() == by_annotation_plugin.keys()
    for ann_id, (name, emb) in by_annotation_cli.items():
        other_name, other = by_annotation_plugin[ann_id]
        assert name == other_name and torch.equal(emb, other), f"annotation {ann_id}"
    assert sorted(cli.class_names) == sorted(plugin.class_names)
    order = [plugin.class_names.index(c) for c in cli.class_names]
    assert torch.equal(cli.prototypes(), plugin.prototypes()[order])

    # the boxes were chosen to trip a naive conversion (relative x * width, truncated), in every variant
    convert = refseg_fiftyone.convert
    by_id = {a["id"]: a for a in coco["annotations"]}
    tricky = 0
    for sample in dataset.match_tags("reference"):
        for det in sample.ground_truth.detections:
            x, y, w, h = by_id[det.coco_id]["bbox"]
            tricky += _naive_misses((x, y, w, h)) > 0
            assert convert.detection_box_pixels(det, HEIGHT, WIDTH) == (x, y, x + w, y + h)  # the CLI's floats
    assert tricky >= len(by_id) // 2


def _cli_records(setup, out: Path, *extra: str) -> dict[str, list[dict]]:
    _cli("predict", "--bank", str(setup["cli_bank"]), "--images", str(setup["targets"]), "--out", str(out),
         "--quiet", *CLI_TOY, *extra)
    names = {im["id"]: im["file_name"] for im in json.loads(out.with_name(out.stem + ".images.json").read_text())}
    cats = {c["id"]: c["name"] for c in json.loads(out.with_name(out.stem + ".categories.json").read_text())}
    by_image: dict[str, list[dict]] = {n: [] for n in names.values()}
    for r in json.loads(out.read_text()):
        by_image[names[r["image_id"]]].append({**r, "label": cats[r["category_id"]]})
    return by_image


def test_cli_and_plugin_write_the_same_exact_boxes_and_only_the_paper_preset_is_short(setup, tmp_path):
    dataset = setup["dataset"]
    convert = refseg_fiftyone.convert
    default = _cli_records(setup, tmp_path / "default.json")  # no --preset: the default preset
    paper = _cli_records(setup, tmp_path / "paper.json", "--preset", "paper")
    report = op("auto_label")(dataset, bank_name="agree", delegate=False)
    assert report["num_labelled"] == 4 and report["num_failed"] == 0

    compared = 0
    for sample in dataset.match_tags("reference", bool=False):
        name = Path(sample.filepath).name
        mine = sample.refseg.detections
        assert len(mine) == len(default[name]) == len(paper[name]) > 0
        for det, rec, short in zip(mine, default[name], paper[name]):
            assert det.label == rec["label"] and det.confidence == rec["score"] == short["score"]
            full = convert.detection_mask(det, HEIGHT, WIDTH)
            assert np.array_equal(full, decode_rle(rec["segmentation"]))
            assert rec["segmentation"] == short["segmentation"]
            ys, xs = np.nonzero(full)
            extent = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
            assert list(convert.pixel_xywh(det.bounding_box, HEIGHT, WIDTH)) == rec["bbox"] == extent
            x, y, w, h = rec["bbox"]
            assert short["bbox"] == [x, y, w - 1, h - 1]
            compared += 1
    assert compared >= 8


def test_pixel_numbers_come_back_exactly_from_relative_coordinates():
    """Every integer pixel, and COCO-style decimals, on image sizes where ``relative * size`` misses them."""
    convert = refseg_fiftyone.convert
    rng = np.random.default_rng(0)
    for size in (211, 259, 480, 640, 1333, 4032):
        assert all(convert._pixel_value(c / size, size) == c for c in range(size + 1))
        for value in [round(float(v), int(d)) for v, d in zip(rng.uniform(-5, size + 5, 300), rng.integers(1, 7, 300))]:
            assert convert._pixel_value(value / size, size) == value
        # any other relative value (e.g. drawn in the App) comes back as relative * size, give or take an ulp
        for rel in rng.uniform(0, 1, 100).tolist():
            assert abs(convert._pixel_value(rel, size) - rel * size) <= 2e-15 * size
    x, y, w, h = 10.25, 20.3, 40.75, 30.9  # the CLI's corners: int(10.25), int(20.3), int(51.0), int(51.2)
    det = fo.Detection(label="x", bounding_box=[x / 259, y / 211, w / 259, h / 211])
    assert convert.detection_box_pixels(det, 211, 259) == (x, y, x + w, y + h)
    assert convert.box_to_pixels(det.bounding_box, 211, 259) == (10, 20, 51, 51)
