"""benchmarks/gpu_throughput.py end to end in its --smoke mode (CPU, tiny models): every row, positive numbers."""

import importlib.util
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")


def _benchmark():
    path = os.path.join(REPO, "benchmarks", "gpu_throughput.py")
    spec = importlib.util.spec_from_file_location("gpu_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_prints_every_row_with_positive_numbers(capsys):
    rows = _benchmark().run(["--smoke"])
    lines = capsys.readouterr().out.splitlines()
    table = {line.split("|")[0].strip(): line for line in lines if "|" in line and not line.startswith(("+", "|"))}
    expected = {"reid": ("images/s", "GFLOP/img", "TFLOP/s", "MFU %", "ms/step"),
                "personmae r=0": ("images/s", "GFLOP/img", "MFU %"), "personmae r=0.5": ("images/s", "GFLOP/img"),
                "personmae r=0.75": ("images/s", "GFLOP/img"), "valpat": ("images/s", "GFLOP/img", "MFU %"),
                "eval smoke 64x512x32": ("seconds", "queries/s"),
                "loader (0 workers)": ("wait ms", "finish ms", "step ms", "wait share %", "finish share %")}
    assert set(expected) <= set(table), sorted(table)
    for name, keys in expected.items():
        cells = dict(re.fullmatch(r"(.+?) (\S+)", cell.strip()).groups() for cell in table[name].split("|")[1:])
        for key in keys:
            assert float(cells[key]) > 0, (name, key, table[name])
    assert [r["row"] for r in rows] == list(expected)
    # FLOPs are counted, not assumed: fewer visible patches, fewer FLOPs per image
    mae = [r["GFLOP/img"] for r in rows if r["row"].startswith("personmae")]
    assert mae[0] > mae[1] > mae[2] > 0
    assert any(line.startswith("goal reID fine-tune MFU >= 45%") for line in lines)
