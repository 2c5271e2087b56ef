"""slurm/memory_estimate.py refuses a layout it cannot estimate in one line (exit 2), for the
training and the OPD estimate alike (it printed a ValueError traceback before)."""

import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.parametrize("argv, expected", [
    (["opd", "--preset", "nano", "--ep", "4", "--dp", "2", "--check"], "EP 4 must divide DP 2"),
    (["--preset", "nano", "--ep", "3", "--dp", "64", "--micro-batch-size", "1"],
     "EP 3 must divide DP 64"),
    (["--preset", "giant", "--ep", "8", "--dp", "64", "--micro-batch-size", "1"],
     "--preset: unknown preset 'giant'"),
])
def test_a_layout_it_cannot_estimate_is_one_line(argv, expected):
    r = subprocess.run([sys.executable, str(REPO / "slurm" / "memory_estimate.py"), *argv],
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("memory_estimate.py: error: "), r.stderr
    assert expected in lines[0]
