"""Context parallelism is exact: a sequence split over 2 ranks (and over 2 x 2 with tensor and sequence parallelism)
gives the unsplit model's logits, loss and every gradient, for every mixer.

The batch packs documents (``packing: boundaries``) with one starting exactly at the split in one row and one
spanning it in the other, and the loss adds the same rows unpacked, so each mixer's context-parallel rule is
exercised both ways: global attention (keys/values of every chunk; over the packed rows the second rank attends in
blocks of the documents' reach, 10, the first, and one rank, with the dense mask), sliding-window attention (a halo of
``window - 1`` positions, here wider than a chunk), short convolutions (a halo of ``kernel - 1``), the RG-LRU,
Mamba-1 (one and several heads) and Mamba-2 (scans carried across ranks; Mamba-2 with chunks that do not divide
a rank's part), Hyena's long convolutions (implicit filter: the whole sequence's inputs gathered; modal filter: its
recurrence's state carried into the next chunk), MoE with a capacity (whole-sequence capacity and router losses),
and Zamba's shared blocks.
fp64 weights; the loss is fp32 (the cross entropy's precision).
"""

import pytest
import torch

from helpers import run_worker

PRESETS = ["llama-tiny", "local-transformer-tiny:window=24", "griffin-tiny", "mamba-tiny", "mamba2-tiny:ssm_chunk=6",
           "hybrid-moe-tiny:moe_capacity_factor=1.0", "zamba-tiny", "zamba2-tiny", "jamba-tiny", "hyena-tiny",
           "striped-hyena-tiny", "striped-hyena2-tiny", "based-tiny:based_chunk=6",
           "goldfinch-tiny:rwkv_chunk=6", "gryphon-tiny:bigbird_block=3"]  # BigBird blocks of 3: a split inside one
WITH_TP = ["griffin-tiny", "jamba-tiny", "zamba2-tiny", "striped-hyena-tiny", "based-tiny:based_chunk=6",
           "gryphon-tiny:bigbird_block=3", "goldfinch-tiny:rwkv_chunk=6"]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp")
    out = {}
    for name, cp, tp, nproc, presets in (("cp1", 1, 1, 1, PRESETS), ("cp2", 2, 1, 2, PRESETS),
                                         ("cp2-tp2-sp", 2, 2, 4, WITH_TP)):
        out[name] = run_worker(tmp / f"{name}.pt", "cp_worker.py", nproc, cp, tp, tmp / f"{name}.pt", *presets)
    return out


def assert_equal_layouts(got: dict, ref: dict) -> None:
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=2e-6, atol=0)
    assert got["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=name)


@pytest.mark.parametrize("preset", PRESETS)
def test_cp2_equals_cp1(layouts, preset):
    assert_equal_layouts(layouts["cp2"][preset], layouts["cp1"][preset])


@pytest.mark.parametrize("preset", WITH_TP)
def test_cp2_tp2_sequence_parallel_equals_one_rank(layouts, preset):
    assert_equal_layouts(layouts["cp2-tp2-sp"][preset], layouts["cp1"][preset])

