"""`chimera train --dry-run`'s per-rank memory plan is what a real run holds: parameter and optimizer bytes exactly, on
every rank, for data parallelism under each ZeRO stage, pipeline stages, tensor and expert parallelism and bf16;
gradient bytes where the model's own gradients are all there is (no ZeRO: without ZeRO 1-3's internal buffers).
"""

import pytest

from helpers import run_worker

LAYOUTS = {
    "dp2-zero0": ("griffin-tiny", []),
    "dp2-zero1": ("griffin-tiny", ["parallel.zero_stage=1"]),
    "dp2-zero2": ("griffin-tiny", ["parallel.zero_stage=2"]),
    "dp2-zero3": ("griffin-tiny", ["parallel.zero_stage=3"]),
    "pp2-zero1": ("griffin-tiny", ["parallel.pipeline=2", "parallel.zero_stage=1"]),
    "tp2": ("griffin-tiny", ["parallel.tensor=2"]),
    "ep2-zero1": ("jamba-tiny", ["parallel.expert=2", "parallel.zero_stage=1"]),
    "dp2-bf16": ("griffin-tiny", ["train.precision=bf16"]),
    "dp2-zero3-bf16": ("griffin-tiny", ["parallel.zero_stage=3", "train.precision=bf16"]),
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "memory.pt"
    specs = [f"{name}={';'.join([model, *fields])}" for name, (model, fields) in LAYOUTS.items()]
    return run_worker(out, "memory_worker.py", 2, out, *specs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_plan_matches_what_a_run_holds(measured, layout):
    for rank, row in enumerate(measured[layout]):
        got, planned = row["measured"], row["planned"]
        assert got["parameters"] == planned["parameters"], (rank, got, planned)
        assert got["optimizer"] == planned["optimizer"], (rank, got, planned)
        if "zero" not in layout or layout.endswith("zero0"):
            assert got["gradients"] == planned["gradients"], (rank, got, planned)
    if layout.startswith("pp2"):  # the stages hold different layers
        assert measured[layout][0]["measured"] != measured[layout][1]["measured"]
