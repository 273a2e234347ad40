"""Packing with boundaries: a packed batch gives exactly the outputs of its documents run separately."""

import pytest
import torch

from helpers import build_model


def packed_batch(docs):
    ids = torch.cat(docs)[None]
    seg = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    return ids, seg, pos


@pytest.mark.parametrize("preset", ["griffin-tiny", "hawk-tiny", "transformer-tiny", "local-transformer-tiny",
                                    "based-tiny", "gryphon-tiny", "hyena-tiny", "striped-hyena-tiny",
                                    "striped-hyena2-tiny", "goldfinch-tiny"])
def test_packed_equals_separate(single_process, preset):
    model = build_model(preset, seed=1).double()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 257, (n,), generator=g) for n in (7, 30, 1, 22)]  # 30 > window 16
    ids, seg, pos = packed_batch(docs)
    packed = model(ids, segment_ids=seg, position_ids=pos)[0]
    separate = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, separate, rtol=1e-10, atol=1e-10)
    # without boundaries, documents do see each other
    assert (model(ids)[0] - separate).abs().max() > 1e-3


def test_packed_loss_and_gradients_flow(single_process):
    model = build_model("griffin-tiny", seed=1)
    ids, seg, pos = packed_batch([torch.arange(5, 25), torch.arange(40, 50)])
    loss = model(ids, labels=torch.roll(ids, -1, 1), segment_ids=seg, position_ids=pos)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
