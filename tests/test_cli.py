"""The refseg command line, in-process, with the toy colour components."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from refseg import MemoryBank
from refseg.cli import main
from refseg.testing import ColorRegionProposer, make_train_val

TOY = ["--encoder", "refseg.testing:ColorEncoder", "--device", "cpu", "--set", "proposal.image_size=256"]
PROPOSER = ["--proposer", "refseg.testing:ColorRegionProposer"]
COUNT_ENV = "REFSEG_TEST_PROPOSE_COUNT"


class CountingProposer(ColorRegionProposer):
    """Appends one line per proposed image to the file named by $REFSEG_TEST_PROPOSE_COUNT."""

    def propose(self, images):
        with open(os.environ[COUNT_ENV], "a") as fh:
            fh.write("x\n" * len(images))
        return super().propose(images)


def proposed(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    train_images, train_json, val_images, val_json = make_train_val(root, 8, 6)
    return {"root": root, "train_images": train_images, "train_json": train_json, "val_images": val_images,
            "val_json": val_json}


@pytest.fixture(scope="module")
def bank(data):
    root = data["root"]
    refs = root / "refs.json"
    assert main(["sample", "--coco", str(data["train_json"]), "--shots", "2", "--out", str(refs)]) == 0
    # one box-only reference: the proposer is then needed to make its mask
    coco = json.loads(refs.read_text())
    coco["annotations"][0].pop("segmentation")
    refs.write_text(json.dumps(coco))
    out = root / "bank.safetensors"
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert main(["build-bank", "--references", str(refs), "--images", str(data["train_images"]),
                     "--out", str(out), *PROPOSER, *TOY]) == 0
    data["build_log"] = log.getvalue()
    return out


def run_predict(bank, data, out, *extra, proposer=PROPOSER):
    return main(["predict", "--bank", str(bank), "--coco", str(data["val_json"]), "--images", str(data["val_images"]),
                 "--out", str(out), "--quiet", *proposer, *TOY, *extra])


def test_full_flow(data, bank, tmp_path, capsys):
    loaded = MemoryBank.load(bank)
    assert loaded.counts() == {"red": 2, "green": 2, "blue": 2}
    assert "1 box-only reference" in data["build_log"]  # and it was used: 2 of 2 red references
    out = tmp_path / "results.json"
    assert run_predict(bank, data, out, "--batch-size", "2") == 0
    assert re.search(r"for 6 image\(s\): \d+\.\d+ images/s", capsys.readouterr().out)
    results = json.loads(out.read_text())
    assert results and {"image_id", "category_id", "bbox", "segmentation", "score"} <= set(results[0])
    cats = json.loads((tmp_path / "results.categories.json").read_text())
    assert {c["name"]: c["id"] for c in cats} == {"red": 1, "green": 2, "blue": 3}
    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", "--gt", str(data["val_json"]), "--results", str(out), "--json-out", str(metrics)]) == 0
    stats = json.loads(metrics.read_text())
    assert stats["segm"]["AP"] > 0.6 and stats["bbox"]["AP"] > 0.6
    assert "Average Precision" in capsys.readouterr().out
    renders = tmp_path / "renders"
    assert main(["render", "--images", str(data["val_images"]), "--results", str(out), "--out", str(renders),
                 "--max-images", "2"]) == 0
    pngs = sorted(renders.glob("*.png"))
    assert len(pngs) == 2
    with Image.open(pngs[0]) as im:
        im.verify()
    with Image.open(pngs[0]) as im:
        assert im.format == "PNG" and im.size == (256, 192)


def test_predict_resumes(data, bank, tmp_path, monkeypatch):
    counter = tmp_path / "count.txt"
    monkeypatch.setenv(COUNT_ENV, str(counter))
    counting = ["--proposer", "test_cli:CountingProposer"]
    out = tmp_path / "results.json"
    assert run_predict(bank, data, out, proposer=counting) == 0
    assert proposed(counter) == 6
    first = json.loads(out.read_text())
    partial = tmp_path / "results.partial.jsonl"
    lines = partial.read_text().splitlines(keepends=True)
    assert len(lines) == 1 + 6  # header + one line per image

    # a killed run: three images done, the fourth cut mid-line, no final file
    partial.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    out.unlink()
    assert run_predict(bank, data, out, proposer=counting) == 0
    assert proposed(counter) == 6 + 3  # only the three unfinished images were labelled again
    assert json.loads(out.read_text()) == first  # nothing lost, nothing duplicated
    ids = [json.loads(line)["image_id"] for line in partial.read_text().splitlines()[1:]]
    assert sorted(ids) == [1, 2, 3, 4, 5, 6]

    assert run_predict(bank, data, out, proposer=counting) == 0  # all done: nothing recomputed
    assert proposed(counter) == 9
    assert json.loads(out.read_text()) == first

    # killed just before the last newline: that record is whole, so it is kept, not recomputed
    partial.write_text(partial.read_text().rstrip("\n"))
    assert run_predict(bank, data, out, proposer=counting) == 0
    assert proposed(counter) == 9 and json.loads(out.read_text()) == first
    assert partial.read_text().endswith("}\n")


def test_predict_refuses_progress_of_another_run(data, bank, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert run_predict(bank, data, out, "--limit", "2") == 0
    capsys.readouterr()
    assert run_predict(bank, data, out, "--set", "merge.top_k=3") == 2
    assert "different run" in capsys.readouterr().err
    assert run_predict(bank, data, out, "--set", "merge.top_k=3", "--restart") == 0
    results = json.loads(out.read_text())
    assert {r["image_id"] for r in results} == set(range(1, 7))
    assert max(sum(r["image_id"] == i for r in results) for i in range(1, 7)) <= 3


def test_corrupt_image_is_reported_and_others_labelled(data, bank, tmp_path, capsys):
    folder = tmp_path / "images"
    shutil.copytree(data["val_images"], folder)
    (folder / "synthetic_0002b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    out = tmp_path / "results.json"
    rc = main(["predict", "--bank", str(bank), "--images", str(folder), "--out", str(out), "--batch-size", "3",
               "--quiet", *PROPOSER, *TOY])
    assert rc == 3  # finished, but an image failed
    captured = capsys.readouterr()
    assert "synthetic_0002b.png" in captured.out and "1 failed" in captured.out
    images = {d["id"]: d["file_name"] for d in json.loads((tmp_path / "results.images.json").read_text())}
    assert len(images) == 7
    bad_id = next(i for i, f in images.items() if f == "synthetic_0002b.png")
    labelled = {r["image_id"] for r in json.loads(out.read_text())}
    assert labelled == set(images) - {bad_id}  # the corrupt image's batch mates were labelled
    records = [json.loads(line) for line in (tmp_path / "results.partial.jsonl").read_text().splitlines()[1:]]
    assert [r["image_id"] for r in records if "error" in r] == [bad_id]

    # the image is repaired (a copy of another one) and the same command run again: only it is labelled, and the
    # results list it once, in image-id order, after a damaged line in the progress file was skipped
    shutil.copy(folder / "synthetic_0003.png", folder / "synthetic_0002b.png")
    partial = tmp_path / "results.partial.jsonl"
    lines = partial.read_text().splitlines(keepends=True)
    partial.write_text(lines[0] + "{damaged\n" + "".join(lines[1:]))
    capsys.readouterr()
    rc = main(["predict", "--bank", str(bank), "--images", str(folder), "--out", str(out), "--batch-size", "3",
               "--quiet", *PROPOSER, *TOY])
    assert rc == 0
    captured = capsys.readouterr()
    assert "6 done earlier, 1 labelled now, 0 failed" in captured.out and "unreadable line" in captured.err
    results = json.loads(out.read_text())
    ids = [r["image_id"] for r in results]
    assert ids == sorted(ids) and set(ids) == set(images)
    repaired = [r for r in results if r["image_id"] == bad_id]
    twin = next(i for i, f in images.items() if f == "synthetic_0003.png")
    assert [r["segmentation"] for r in repaired] == [r["segmentation"] for r in results if r["image_id"] == twin]
    assert "{damaged" not in partial.read_text()  # dropped from the progress file


def test_user_errors_exit_2_with_one_line(data, bank, tmp_path, capsys):
    def check(argv, expected):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert expected in err and "Traceback" not in err, err
        return err

    missing = str(tmp_path / "nope.json")
    check(["sample", "--coco", missing, "--shots", "1", "--out", str(tmp_path / "r.json")], "not found")
    check(["sample", "--coco", str(data["train_json"]), "--shots", "1", "--classes", "purple",
           "--out", str(tmp_path / "r.json")], "unknown class")
    check(["sample", "--coco", str(data["train_json"]), "--shots", "50", "--out", str(tmp_path / "r.json")],
          "fewer than 50")
    check(["sample", "--coco", str(data["train_json"]), "--out", str(tmp_path / "r.json")], "--shots")
    check(["build-bank", "--references", str(data["train_json"]), "--images", str(tmp_path / "none"),
           "--out", str(tmp_path / "b.safetensors"), *TOY], "image folder not found")
    check(["predict", "--bank", missing, "--images", str(data["val_images"]), "--out", str(tmp_path / "o.json"),
           *PROPOSER, *TOY], "memory bank not found")
    check(["predict", "--bank", str(bank), "--images", str(data["val_images"]), "--out", str(tmp_path / "o.json"),
           *PROPOSER, *TOY, "--set", "merge.nonsense=1"], "unknown setting")
    check(["predict", "--bank", str(bank), "--images", str(data["val_images"]), "--out", str(tmp_path / "o.json"),
           "--proposer", "no_such_module:Thing", *TOY], "cannot build proposer")
    check(["predict", "--bank", str(bank), "--images", str(data["val_images"]), "--out", str(tmp_path / "o.json"),
           *PROPOSER, "--device", "cpu"], "--encoder")
    other = MemoryBank({"name": "another-encoder", "dim": 6})
    other.add("red", torch.ones(6))
    other_path = other.save(tmp_path / "other.safetensors")
    check(["predict", "--bank", str(other_path), "--images", str(data["val_images"]),
           "--out", str(tmp_path / "o.json"), *PROPOSER, *TOY], "different features")
    not_a_bank = tmp_path / "junk.safetensors"
    not_a_bank.write_bytes(b"garbage")
    check(["predict", "--bank", str(not_a_bank), "--images", str(data["val_images"]),
           "--out", str(tmp_path / "o.json"), *PROPOSER, *TOY], "cannot read memory bank")
    check(["evaluate", "--gt", str(data["val_json"]), "--results", missing], "results file not found")
    check(["evaluate", "--gt", str(data["val_json"]), "--results", str(data["val_json"])], "not a COCO results file")
    check(["evaluate", "--gt", str(data["val_json"]), "--results", str(data["val_json"]), "--iou-types", "mask"],
          "--iou-types")


def test_build_bank_reports_skipped_and_unusable(data, tmp_path, capsys):
    coco = json.loads(Path(data["train_json"]).read_text())
    coco["images"][0]["file_name"] = "missing.png"
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps(coco))
    out = tmp_path / "bank.safetensors"
    assert main(["build-bank", "--references", str(refs), "--images", str(data["train_images"]), "--out", str(out),
                 "--classes", "red,green", *TOY]) == 0
    text = capsys.readouterr().out
    assert "missing.png" in text and "skipped" in text
    assert set(MemoryBank.load(out).class_names) == {"red", "green"}


def test_demo_and_models(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "demo finished" in out
    assert list((tmp_path / "demo" / "renders").glob("*.png"))
    assert json.loads((tmp_path / "demo" / "metrics.json").read_text())["segm"]["AP"] > 0.5
    assert main(["models", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sam2_hiera_l" in out and "dinov2_vitl14" in out and "missing" in out
    assert "https://dl.fbaipublicfiles.com/" in out
    assert main(["--version"]) == 0


def test_console_script_help():
    script = Path(sys.executable).parent / "refseg"
    if not script.exists():
        found = shutil.which("refseg")
        if found is None:
            pytest.skip("the refseg console script is not installed")
        script = Path(found)
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "build-bank" in proc.stdout and "predict" in proc.stdout


def test_predict_on_two_devices_matches_one(data, bank, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert run_predict(bank, data, one, "--batch-size", "2") == 0
    assert run_predict(bank, data, two, "--batch-size", "2", "--devices", "cpu,cpu") == 0
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert [(r["image_id"], r["category_id"], r["segmentation"]["counts"]) for r in a] == \
           [(r["image_id"], r["category_id"], r["segmentation"]["counts"]) for r in b]
    assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], abs=1e-6)
    # the two workers fill one candidate cache, which one device then reads
    cache, three = tmp_path / "candidates", tmp_path / "three.json"
    assert run_predict(bank, data, two, "--devices", "cpu,cpu", "--candidate-cache", str(cache), "--restart") == 0
    assert json.loads(two.read_text()) == b
    assert run_predict(bank, data, three, "--candidate-cache", str(cache)) == 0
    assert json.loads(three.read_text()) == a
    assert len(list(cache.iterdir())) == 1  # the same stage-1 settings in the workers and here: one cache


def test_predict_with_candidate_cache_relabels_without_networks(data, bank, tmp_path, monkeypatch, capsys):
    """A second bank (here: two of the three classes) relabels from the cache: no image proposed again, and the
    results equal a run without cache."""
    counter = tmp_path / "count.txt"
    monkeypatch.setenv(COUNT_ENV, str(counter))
    counting = ["--proposer", "test_cli:CountingProposer"]
    cache = tmp_path / "candidates"
    first = tmp_path / "first.json"
    assert run_predict(bank, data, first, "--candidate-cache", str(cache), proposer=counting) == 0
    assert proposed(counter) == 6
    assert "6 written" in capsys.readouterr().out
    assert json.loads(first.read_text()) == _uncached(bank, data, tmp_path / "plain.json")

    fewer = tmp_path / "fewer.safetensors"
    loaded = MemoryBank.load(bank)
    loaded.remove_class("blue")
    loaded.save(fewer)
    second = tmp_path / "second.json"
    assert run_predict(fewer, data, second, "--candidate-cache", str(cache), "--batch-size", "4",
                       proposer=counting) == 0
    assert proposed(counter) == 6  # every image came from the cache
    assert "6 image(s) read from it, 0 written" in capsys.readouterr().out
    want = _uncached(fewer, data, tmp_path / "plain_fewer.json")
    assert json.loads(second.read_text()) == want and want != json.loads(first.read_text())

    # other proposal settings get their own sub-folder instead of wrong entries
    assert run_predict(bank, data, tmp_path / "third.json", "--candidate-cache", str(cache), "--limit", "1",
                       "--set", "proposal.points_per_side=8", proposer=counting) == 0
    assert proposed(counter) == 7 and len([p for p in cache.iterdir() if p.is_dir()]) == 2


def _uncached(bank, data, out) -> list:
    assert run_predict(bank, data, out) == 0
    return json.loads(out.read_text())
