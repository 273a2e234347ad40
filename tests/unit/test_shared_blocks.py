"""Shared blocks really share: one tensor, used at several depths, whose gradient is the sum of the
per-use gradients."""

import torch

from helpers import build_model

SHARED = ["pattern=m0m0", "num_layers=null", "shared_blocks=['*-']", "mlp_hidden=128",
          "num_heads=4"]


def test_one_tensor_at_every_use(single_process):
    model = build_model("mamba-tiny", overrides=SHARED)
    names = [n for n, _ in model.named_parameters()]
    assert sum(n.startswith("shared.0.") for n in names) == 9  # 2 norms + q,k,v,o + gate,up,down
    assert not any(n.startswith(("layers.1.", "layers.3.")) for n in names)
    assert model.layers[1].block is model.layers[3].block is model.shared[0]


def test_gradient_is_the_sum_of_per_use_gradients(single_process):
    shared = build_model("mamba-tiny", overrides=SHARED).double()
    ids = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    shared(ids, labels=labels).backward()

    # the same network with a separate copy of the block at each use: pattern m*-m*-, same weights
    unshared = build_model("mamba-tiny", overrides=SHARED[:2] + ["pattern=m*-m*-", "shared_blocks=[]"] + SHARED[3:])
    unshared = unshared.double()
    where = {"layers.0.": ["layers.0."], "layers.2.": ["layers.3."], "shared.0.0.": ["layers.1.", "layers.4."],
             "shared.0.1.": ["layers.2.", "layers.5."]}
    mine = dict(shared.named_parameters())
    theirs = dict(unshared.named_parameters())
    with torch.no_grad():
        for name, p in mine.items():
            for prefix, targets in where.items():
                if name.startswith(prefix):
                    for t in targets:
                        theirs[t + name[len(prefix):]].copy_(p)
        theirs["embed.weight"].copy_(mine["embed.weight"])
        theirs["final_norm.weight"].copy_(mine["final_norm.weight"])
    unshared(ids, labels=labels).backward()
    for name, p in mine.items():
        if name.startswith("shared.0."):
            rest = name[len("shared.0.0."):]
            uses = ("layers.1.", "layers.4.") if name.startswith("shared.0.0.") else ("layers.2.", "layers.5.")
            first, second = uses
            g1, g2 = theirs[first + rest].grad, theirs[second + rest].grad
            assert g1.abs().max() > 0 and g2.abs().max() > 0
            torch.testing.assert_close(p.grad, g1 + g2, rtol=1e-10, atol=1e-12)


def test_shared_block_decoding_keeps_a_state_per_use(single_process):
    model = build_model("mamba-tiny", overrides=SHARED).double()
    ids = torch.randint(0, 257, (1, 24), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    state = model.init_state(1, 24)
    steps = torch.stack([model.step(ids[:, t], state, t) for t in range(24)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-9)


# ---- Zamba style: the block reads concat(h, embeddings) and feeds the next sublayer's input -----------------

def test_zamba_block_gradient_is_the_sum_of_per_use_gradients(single_process):
    """zamba2-tiny uses block 0 at two depths: give each use its own copy of the block (same weights: the
    block of another model built from the same seed) and the shared tensor's gradient is the sum of the
    copies' gradients."""
    model = build_model("zamba2-tiny").double()
    ids = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    model(ids, labels=labels).backward()
    shared = {n: p.grad.clone() for n, p in model.shared[0].named_parameters()}
    uses = [layer for layer in model.layers if getattr(layer, "index", None) == 0 and hasattr(layer, "linear")]
    assert len(uses) == 2 and uses[0].block is uses[1].block

    model.zero_grad()
    copies = []
    for use in uses:
        use._block = (build_model("zamba2-tiny").double().shared[0],)
        copies.append(use.block)
        for name, p in use.block.named_parameters():
            assert torch.equal(p, dict(model.shared[0].named_parameters())[name])
    model(ids, labels=labels).backward()
    for name, grad in shared.items():
        g1, g2 = (dict(c.named_parameters())[name].grad for c in copies)
        assert g1.abs().max() > 0 and g2.abs().max() > 0
        torch.testing.assert_close(grad, g1 + g2, rtol=1e-10, atol=1e-12)
    assert model.shared[0].input_norm.weight.grad is None  # the copies took every use


def test_zamba_style_decoding_equals_full_forward(single_process):
    for preset in ("zamba-tiny", "zamba2-tiny"):
        model = build_model(preset).double()
        ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(1))
        full = model(ids)
        state = model.init_state(2, 24)
        steps = torch.stack([model.step(ids[:, t], state, t) for t in range(24)], dim=1)
        torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-9)


def test_zamba_style_is_causal(single_process):
    """Changing token t changes no logits before t (the shared attention reads concat(h, embeddings) of every
    position, the per-use state must not leak the future), and does change them from t on."""
    for preset in ("zamba-tiny", "zamba2-tiny"):
        model = build_model(preset).double()
        ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(2))
        changed = ids.clone()
        changed[:, 13] = (changed[:, 13] + 1) % 257
        with torch.no_grad():
            a, b = model(ids), model(changed)
        torch.testing.assert_close(a[:, :13], b[:, :13], rtol=0, atol=0)
        assert (a[:, 13:] - b[:, 13:]).abs().amax(-1).min() > 1e-9
