"""The benchmark scripts run (CPU, small settings) and report what they promise. Not timed: speed is
measured by running them, not asserted here."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_pipeline_benchmark_small_preset_on_cpu(tmp_path):
    path = tmp_path / "bench.json"
    stdout = _run("benchmark.py", "--small", "--device", "cpu", "--images", "2", "--json", str(path))
    result = json.loads(path.read_text())
    assert "random" in stdout and "images/s" in stdout
    assert result["images_per_s"] > 0 and result["machine"]["torch"] and result["machine"]["device"] == "cpu"
    stages = result["ms_per_stage"]
    assert set(stages) >= {"image decode", "SAM2 encoder", "prompt decoding", "DINOv2", "pooling", "matching+NMS",
                           "merging", "writing"}
    assert stages["SAM2 encoder"] > 0 and stages["prompt decoding"] > 0 and stages["DINOv2"] > 0
    assert result["peak_host_memory_mb"] > 0 and result["settings"]["images"] == 2


def test_rematch_benchmark_small_on_cpu(tmp_path):
    path = tmp_path / "rematch.json"
    stdout = _run("rematch.py", "--image-size", "256", "--grid", "4", "--encoder-size", "112", "--images", "1",
                  "--warmup", "0", "--device", "cpu", "--json", str(path))
    assert "random" in stdout.lower()
    summary = json.loads(path.read_text())["summary"]
    assert summary["all_equal"] and summary["sam_like"]["agreement"]["identical_masks"]
    assert summary["cached_s"] > 0 and summary["uncached_s"] > 0 and summary["entry_bytes"] > 0


def test_stage2_benchmark_small_on_cpu(tmp_path):
    path = tmp_path / "stage2.json"
    stdout = _run("stage2.py", "--proposals", "40", "--logit-size", "64", "--height", "90", "--width", "120",
                  "--dim", "32", "--repeats", "1", "--json", str(path))
    result = json.loads(path.read_text())
    assert "s/image" in stdout and result["best_s"] > 0 and result["peak_host_mb"] > 0 and result["coco_records_s"] > 0
    assert 0 < result["detections"] <= 40 and result["machine"]["cpu_count"]
