"""The benchmarks still run and print their tables (at toy sizes; the figures themselves live in
bench/RESULTS.md, not in assertions)."""

import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env


def run_bench(*args: str, timeout: int = 600, header: bool = True) -> str:
    run = subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(), text=True,
                         capture_output=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    if header:  # date, machine, package versions above every table
        assert re.search(r"^date: .*\nmachine: .*\npackages: torch ", run.stdout, re.M), run.stdout
    return run.stdout


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line]


@pytest.mark.slow
def test_cpu_tiny_compares_ours_with_hf_in_one_table():
    rows = table_rows(run_bench("bench/bench_cpu_tiny.py", "--rounds", "1", "--steps-per-round", "2"))
    names = [r[0] for r in rows[1:]]
    assert names[0].startswith("ours") and any(n.startswith("HF Qwen3MoeForCausalLM") for n in names)
    assert rows[1][-1] == "1.00x"  # the reference row against itself
    for row in rows[1:]:
        assert float(row[1]) > 0 and re.fullmatch(r"\d+\.\d\dx", row[-1]), row


def test_preprocess_reports_both_worker_counts():
    rows = table_rows(run_bench("bench/bench_preprocess.py", "--repeats", "1"))
    assert [r[0] for r in rows[1:]] == ["1", "2"]
    assert rows[1][-1] == rows[2][-1]  # same tokens whatever the worker count


def test_upcycle_reports_time_and_rss_for_a_two_layer_nano():
    out = run_bench("bench/bench_upcycle.py", "--layers", "2")
    assert re.search(r"\| wall time +\| \d+\.\d s", out) and re.search(r"\| peak RSS +\| \d\.\d\d GiB", out)


def test_gpu_bench_skips_cleanly_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run the benchmark itself")
    out = run_bench("bench/bench_gpu_nano_slice.py", timeout=120, header=False)
    assert "no CUDA device here; skipped" in out


def test_run_all_script_is_shellcheck_clean():
    run = subprocess.run([shutil.which("shellcheck"), "--severity=style", "bench/run_cpu.sh"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
