"""The CPU benchmarks run end to end at tiny sizes (--smoke) and write the JSON their tables come from."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke", "--out", str(out)],
        cwd=BENCH, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["environment"]["loadavg"] is None or len(data["environment"]["loadavg"]) == 3
    return data


@pytest.mark.slow
def test_cpu_ratios_smoke(tmp_path):
    data = run("cpu_ratios.py", tmp_path / "cpu_ratios.json")
    rows = data["results"]
    cache = [r for r in rows if r["section"] == "cache"]
    assert {r["model"] for r in cache} == {"tiny", "mid"}
    for r in cache:
        assert 0 < r["full"] <= r["steps"] and r["s_per_image"] > 0 and r["rounds"] == 2
        if r["cache"] == "none":
            assert r["psnr"] == float("inf") and r["ssim"] == 1.0
    forward = {r["contender"]: r for r in rows if r["section"] == "forward"}
    assert forward["fluxcore compiled"]["max_abs_diff_vs_eager"] <= 1e-4
    assert forward["fluxcore compiled"]["cold_first_call_s"] > 0
    if data["config"]["diffusers"]:  # the same computation as diffusers, at both pipelines and the forward
        assert forward["diffusers"]["max_abs_diff_vs_eager"] <= 1e-4
        pipes = [r for r in rows if r["section"] == "pipeline"]
        assert len(pipes) == 2
        assert all(r["t5_tokens_agree"] and r["max_abs_diff"] <= 1e-4 for r in pipes)


@pytest.mark.slow
def test_cache_quality_smoke(tmp_path):
    rows = run("cache.py", tmp_path / "cache.json")["results"]
    tiny = [r for r in rows if r["model"] == "tiny"]
    assert {"color+position", "shape"} <= set(tiny[0])
    assert tiny[0]["cache"] == "none" and tiny[0]["shape"] == 1.0
    assert {r["model"] for r in rows} == {"tiny", "mid"}


def test_bench_command_runs_one_benchmark(tmp_path):
    """`fluxcore bench NAME [options]` runs benchmarks/NAME's script with the options after it."""
    out = tmp_path / "vae.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fluxcore", "bench", "vae-memory", "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["size"], r["mode"]) for r in rows] == [(128, "untiled"), (256, "tiled"), (256, "tiled-shared")]
    assert all(r["finite"] and r["peak_bytes"] >= 0 and r["plan_decode_activations"] > 0 for r in rows)
    bad = subprocess.run([sys.executable, "-m", "fluxcore", "bench", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr and "Traceback" not in bad.stderr
