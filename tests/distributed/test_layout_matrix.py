"""The layout matrix: every layout gives the single-process run's per-step losses and validation loss (1e-5 relative),
for Griffin, Jamba (Mamba-1 + attention + MoE), Zamba2 (Mamba-2 + shared blocks), Mamba and a Mamba/MoE hybrid.

3 steps of 4 sequences of 32 tokens, fp32, from one seed, on short documents packed with ``packing: boundaries`` (so
document ids cross pipeline stages and context-parallel splits); the single-process run accumulates 2 micro-batches
of 2, the layouts split those over data-parallel ranks (same micro-batches, so MoE router losses agree too). Each
layout also turns on something else a real run combines with it (ZeRO stages where DeepSpeed allows them, sequence
parallelism, activation checkpointing), so the matrix covers the compositions; Griffin and Zamba2 also run with a
sequence-length curriculum (16 then 32 tokens: shapes change between steps) on the pipelined and context-parallel
layouts. The runs go through the trainer (``tests/distributed/layout_worker.py``), several per process group.
"""

import json
import random

import pytest

from helpers import run_worker

# name: (preset, fields)
MODELS = {m: (m, []) for m in ["griffin-tiny", "jamba-tiny", "zamba2-tiny", "mamba-tiny", "hybrid-moe-tiny"]}
CURRICULUM = ["data.curriculum={stages: [[0, 16], [2, 32]]}"]
MODELS.update({f"{m}+curriculum": (m, CURRICULUM) for m in ["griffin-tiny", "zamba2-tiny"]})
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


# the compositions of pipeline or context parallelism with data parallelism, and the deeper pipeline, run on the
# models where they take another path: Zamba2's shared block on 4 stages, MoE router losses over data ranks
# (every model already runs pp2 and cp2 alone, and tp2pp2)
COMPOSED_ON = {"pp4": {"griffin-tiny", "zamba2-tiny"}, "pp2dp2": {"jamba-tiny", "zamba2-tiny"},
               "cp2dp2": {"griffin-tiny", "jamba-tiny"}}


def applies(model: str, layout: str) -> bool:
    if model.endswith("+curriculum"):
        return layout in ("pp2", "tp2pp2", "cp2dp2")
    if layout in COMPOSED_ON:
        return model in COMPOSED_ON[layout]
    return "ep" not in layout or model in WITH_EXPERTS


CASES = [(m, layout) for m in MODELS for layout in LAYOUTS if applies(m, layout)]


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    from chimera.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("matrix")
    rng = random.Random(0)
    words = ["def", "return", "x", "self", "(", ")", ":", "=", "1", "if", "for", "in", "print"]
    with open(tmp / "docs.jsonl", "w") as f:  # short documents: several boundaries in every 32-token sequence
        for _ in range(600):
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(1, 12)))}) + "\n")
    prepare([str(tmp / "docs.jsonl")], "bytes", "zarr", str(tmp / "data"), progress=False)
    data = [f"data.sources=[{{type: zarr, path: {tmp / 'data'}}}]", "data.packing=boundaries"]
    out = {}
    for ranks in (1, 2, 4):
        if ranks == 1:
            specs = [f"{m}/single={';'.join([preset, *data, *fields])}" for m, (preset, fields) in MODELS.items()]
        else:
            specs = [f"{m}/{layout}={';'.join([MODELS[m][0], *data, *MODELS[m][1], *LAYOUTS[layout][1]])}"
                     for m, layout in CASES if LAYOUTS[layout][0] == ranks]
        out.update(run_worker(tmp / f"w{ranks}.pt", "layout_worker.py", ranks, tmp / f"w{ranks}.pt", *specs))
    return out


@pytest.mark.parametrize("model, layout", CASES)
def test_layout_equals_single_process(losses, model, layout):
    got, ref = losses[f"{model}/{layout}"], losses[f"{model}/single"]
    assert len(got) == len(ref) == 4  # 3 steps, then validation
    for step, (a, b) in enumerate(zip(got, ref), start=1):
        what = f"step {step}" if step <= 3 else "validation"
        assert abs(a - b) <= 1e-5 * abs(b), f"{what}: {a} vs single-process {b}"
    assert ref[2] < ref[0]  # it trains
