"""Smoke test: the benchmark runs end to end on tiny sizes (it measures; it asserts nothing about speed).

Minutes each, so outside the default run: ``python -m pytest -m bench``."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_runs_and_prints_every_section():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--no_record"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for title in ("Overhead", "Data", "Memory"):
        assert f"**{title}" in proc.stdout
    assert "speed ratio" in proc.stdout and "headroom" in proc.stdout


@pytest.mark.slow
def test_memory_real_quick_runs_and_prints_both_sections():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_real.py"), "--quick", "--no_record",
                           "--weight_dtypes", "default", "fp8_e4m3fn"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "**Real width" in proc.stdout and "**Distance from the bf16 base" in proc.stdout


def test_bench_startup_section_runs_on_a_small_dataset():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--startup", "--startup_rows", "300",
                           "--startup_kinds", "bucketed", "--startup_steps", "0", "--no_record"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "**Start-up against dataset size" in proc.stdout and "| bucketed | 300 | after |" in proc.stdout


def test_memory_video_quick_runs_every_family_and_block_kind():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_video.py"), "--quick", "--no_record"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "**Video memory" in proc.stdout
    for row in ("| wan_14b | 256 | 2 | 5 -> 2 | 64x64 -> 8x8 | 32 | off |",
                "| hunyuan_video | 256 | 2 double + 1 single |", "| hunyuan_video | 256 | 1 double + 2 single |"):
        assert row in proc.stdout
    assert "per block" in proc.stdout and "per double block" in proc.stdout and "per single block" in proc.stdout
