"""The layout matrix: every layout gives the single-process run's per-step losses (1e-5 relative), for Griffin,
Jamba (Mamba-1 + attention + MoE), Zamba2 (Mamba-2 + shared blocks), Mamba and a Mamba/MoE hybrid.

3 steps of 4 sequences of 32 tokens, fp32, from one seed; the single-process run accumulates 2 micro-batches of 2,
the layouts split those over data-parallel ranks (same micro-batches, so MoE router losses agree too). Each layout
also turns on something else a real run combines with it (ZeRO stages where DeepSpeed allows them, sequence
parallelism, activation checkpointing), so the matrix covers the compositions. The runs go through the trainer
(``tests/distributed/layout_worker.py``), several per process group, to keep the matrix cheap.
"""

import pytest

from helpers import run_worker

MODELS = ["griffin-tiny", "jamba-tiny", "zamba2-tiny", "mamba-tiny", "hybrid-moe-tiny"]
WITH_EXPERTS = {"jamba-tiny", "hybrid-moe-tiny"}

# name: (ranks, fields)
LAYOUTS = {
    "pp2": (2, ["parallel.pipeline=2", "parallel.zero_stage=1"]),
    "cp2": (2, ["parallel.context=2", "parallel.zero_stage=3"]),
    "ep2": (2, ["parallel.expert=2", "parallel.zero_stage=2"]),
    "pp4": (4, ["parallel.pipeline=4", "train.activation_checkpointing=true"]),
    "tp2pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true",
                   "parallel.zero_stage=1"]),
    "pp2dp2": (4, ["parallel.pipeline=2", "parallel.zero_stage=1", "train.activation_checkpointing=true"]),
    "cp2dp2": (4, ["parallel.context=2", "parallel.zero_stage=2"]),
    "ep2tp2": (4, ["parallel.expert=2", "parallel.tensor=2", "parallel.sequence_parallel=true",
                   "parallel.zero_stage=1"]),
}


def applies(model: str, layout: str) -> bool:
    return "ep" not in layout or model in WITH_EXPERTS


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matrix")
    out = {}
    for ranks in (1, 2, 4):
        specs = [f"{m}/single={m}" for m in MODELS] if ranks == 1 else [
            f"{m}/{layout}={m},{','.join(fields)}" for layout, (n, fields) in LAYOUTS.items() if n == ranks
            for m in MODELS if applies(m, layout)]
        out.update(run_worker(tmp / f"w{ranks}.pt", "layout_worker.py", ranks, tmp / f"w{ranks}.pt", *specs))
    return out


@pytest.mark.parametrize("model, layout", [(m, layout) for m in MODELS for layout in LAYOUTS if applies(m, layout)])
def test_layout_equals_single_process(losses, model, layout):
    got, ref = losses[f"{model}/{layout}"], losses[f"{model}/single"]
    assert len(got) == len(ref) == 3
    for step, (a, b) in enumerate(zip(got, ref), start=1):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: {a} vs single-process {b}"
    assert ref[2] < ref[0]  # it trains
