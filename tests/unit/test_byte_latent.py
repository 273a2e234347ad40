"""The byte-latent model (Hyena-GLT): patches against a step-by-step segmentation, causality of the byte logits,
decoding against the full forward pass, deterministic boundaries, documents kept apart, the type embedding."""

import pytest
import torch

from chimera.configs.loader import load_model_config
from chimera.models.byte_latent import ByteLatentLM
from chimera.models.causal_lm import build_model
from chimera.models.patching import ByteLatentConfig, next_byte_entropy, segment

PRESET = "hyena-glt-tiny"


def model_with(*overrides, seed=0):
    """The preset's model, its entropy model's predictions sharpened (the final norm's gain x30): an untrained one
    is near uniform, its entropies crowd within a few thousandths of a nat, and a boundary decided there flips with
    the last bit that decoding and the full pass round differently. Sharpened, they spread over ~3.5 nats."""
    model = build_model(load_model_config(PRESET, list(overrides)), seed=seed).eval()
    with torch.no_grad():
        model.entropy.final_norm.weight.mul_(30)
    return model


def ids(b, s, seed=0):
    return torch.randint(0, 256, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def threshold():
    """An entropy threshold that cuts the entropy model's bytes into patches of varied length and lies well clear of
    every entropy the tests meet: the midpoint of the widest gap between neighbouring entropies in their middle half
    (~0.05 nats here; decoding and the full pass differ by ~2e-6)."""
    model = model_with()
    with torch.no_grad():
        entropies = torch.cat([next_byte_entropy(model.entropy(ids(2, 48, seed=seed))).flatten()
                               for seed in range(8)]).sort().values
    middle = entropies[len(entropies) // 4: 3 * len(entropies) // 4]
    widest = int((middle[1:] - middle[:-1]).argmax())
    return float(middle[widest: widest + 2].mean())


@pytest.fixture(scope="module")
def model(threshold):
    return model_with(f"byte_latent.entropy_threshold={threshold}")


def reference_segmentation(closes, segment_ids):
    """Byte by byte: a patch begins at a row's first byte, a document's first byte, or after a byte that closes one;
    a byte reads its own patch if it closes it, else the patch before, unless that lies in an earlier document."""
    starts, index, reads = [], [], []
    for row_closes, row_seg in zip(closes.tolist(), segment_ids.tolist()):
        s_row, i_row, r_row, patch, doc_first = [], [], [], -1, 0
        for t, (c, seg) in enumerate(zip(row_closes, row_seg)):
            begins = t == 0 or seg != row_seg[t - 1] or row_closes[t - 1]
            patch += begins
            if t == 0 or seg != row_seg[t - 1]:
                doc_first = patch
            read = patch if c else patch - 1
            s_row.append(begins), i_row.append(patch), r_row.append(read if read >= doc_first else -1)
        starts.append(s_row), index.append(i_row), reads.append(r_row)
    return torch.tensor(starts), torch.tensor(index), torch.tensor(reads)


def test_patches_cover_every_byte_exactly_once_and_match_the_byte_by_byte_segmentation():
    g = torch.Generator().manual_seed(1)
    closes = torch.rand(3, 50, generator=g) < 0.3
    segment_ids = torch.randint(0, 2, (3, 50), generator=g).cummax(1).values + (torch.rand(3, 50, generator=g) < 0.05
                                                                                 ).long().cumsum(1)
    patches = segment(closes, segment_ids)
    starts, index, reads = reference_segmentation(closes, segment_ids)
    assert torch.equal(patches.starts, starts) and torch.equal(patches.index, index)
    assert torch.equal(patches.reads, reads)
    for row in range(3):  # each byte in one patch; patches contiguous, numbered 0 .. count - 1, each non-empty
        sizes = torch.bincount(patches.index[row], minlength=patches.length)
        assert sizes.sum() == 50 and (sizes[: patches.count[row]] > 0).all() and (sizes[patches.count[row]:] == 0).all()
        assert set(torch.diff(patches.index[row]).tolist()) <= {0, 1}
        # a patch lies within one document, and its recorded document is that one
        assert torch.equal(patches.segment_ids[row].gather(0, patches.index[row]), segment_ids[row])
        # a byte reads only a patch that has closed at or before it
        for t in range(50):
            r = int(patches.reads[row, t])
            if r >= 0:
                assert int((patches.index[row] == r).nonzero().max()) <= t


def test_stride_patching_cuts_every_stride_bytes_of_each_document():
    cfg = ByteLatentConfig(patching="stride", stride=3)
    from chimera.models.patching import closes_patch

    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    segment_ids = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1]])
    patches = segment(closes_patch(cfg, None, positions), segment_ids)
    assert patches.index.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 3]]
    assert patches.reads.tolist() == [[-1, -1, 0, 0, 0, -1, -1, 2, 2]]


def test_the_threshold_gives_patches_of_varied_length(model):
    patches = model.patches(ids(2, 48))
    assert 1 < patches.count.float().mean() < 48 and patches.length < 48


def test_max_patch_length_caps_every_patch(threshold):
    capped = model_with(f"byte_latent.entropy_threshold={threshold * 100}", "byte_latent.max_patch_length=5")
    patches = capped.patches(ids(2, 48))  # no entropy exceeds the threshold: the cap alone cuts, every 5 bytes
    assert patches.index.tolist() == [[t // 5 for t in range(48)]] * 2


def test_byte_logits_are_causal(model):
    x = ids(2, 48)
    t = 30
    y = x.clone()
    y[:, t] = (y[:, t] + 7) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    assert (a[:, :t] - b[:, :t]).abs().max() < 1e-5
    assert (a[:, t] - b[:, t]).abs().max() > 1e-4
    # through the patches too: the patch structure before t is the same
    pa, pb = model.patches(x), model.patches(y)
    assert torch.equal(pa.index[:, :t], pb.index[:, :t]) and torch.equal(pa.reads[:, :t], pb.reads[:, :t])


def test_decoding_equals_forward(model):
    x = ids(2, 48, seed=3)
    with torch.no_grad():
        full = model(x)
    state = model.init_state(2, 48)
    stepped = torch.stack([model.step(x[:, t], state, t) for t in range(48)], 1)
    assert (stepped - full).abs().max() < 1e-4
    assert [row["closed"] for row in state] == [int(((model.patches(x).reads[i] >= 0) & (
        model.patches(x).reads[i] == model.patches(x).index[i])).sum()) for i in range(2)]


def test_patch_boundaries_are_deterministic_for_a_fixed_entropy_model(threshold):
    x = ids(3, 48, seed=5)
    one = model_with(f"byte_latent.entropy_threshold={threshold}")
    other = model_with(f"byte_latent.entropy_threshold={threshold}", seed=1)
    other.entropy.load_state_dict(one.entropy.state_dict())  # same entropy model, different everything else
    a, b = one.patches(x), other.patches(x)
    assert torch.equal(a.starts, b.starts) and torch.equal(a.reads, b.reads)
    alone = one.patches(x[1:2])  # a row's patches do not depend on the rest of the batch
    assert torch.equal(alone.index, a.index[1:2])
    assert torch.equal(one.patches(x).starts, a.starts)  # and again


def test_packed_documents_are_not_crossed(model):
    first, second = ids(1, 20, seed=6), ids(1, 28, seed=7)
    packed = torch.cat([first, second], 1)
    segment_ids = torch.tensor([[0] * 20 + [1] * 28])
    position_ids = torch.cat([torch.arange(20), torch.arange(28)])[None]
    with torch.no_grad():
        together = model(packed, segment_ids=segment_ids, position_ids=position_ids)
        alone = model(second)
        features = model.features(packed, segment_ids, position_ids)
    assert (together[:, 20:] - alone).abs().max() < 1e-4
    assert (together[:, :20] - model(first)).abs().max() < 1e-4
    assert (features[:, 20:] - model.features(second)).abs().max() < 1e-4
    patches = model.patches(packed, segment_ids, position_ids)
    assert patches.index[0, 20] == patches.index[0, 19] + 1  # a document's first byte begins a patch


def test_features_are_one_vector_per_input_byte(model):
    x = ids(2, 48)
    features = model.features(x)
    assert features.shape == (2, 48, model.cfg.local_model.d_model)
    # the features are what the byte head reads
    logits = model.local.head(features.transpose(0, 1)).transpose(0, 1)
    assert (logits - model(x)).abs().max() < 1e-5


def test_type_embedding_makes_dna_and_protein_differ(model, threshold):
    x = torch.tensor([list(b"ACGTACGGTTACGATCGATCGGCTAGCTAG")])
    with torch.no_grad():
        dna, protein = model(x, sequence_type="dna"), model(x, sequence_type="protein")
        assert (dna - protein).abs().max() > 1e-3
        assert torch.equal(dna, model(x))  # the configured type (dna) by default
        as_protein = model_with(f"byte_latent.entropy_threshold={threshold}", "byte_latent.sequence_type=protein")
        assert torch.equal(as_protein(x), protein)
        state = as_protein.init_state(1, x.shape[1])
        stepped = torch.stack([as_protein.step(x[:, t], state, t) for t in range(x.shape[1])], 1)
    assert (stepped - protein).abs().max() < 1e-4


def test_training_loss_is_byte_loss_plus_entropy_loss_and_metrics_report_patches(model):
    x = ids(2, 48)
    labels = x.roll(-1, 1)
    model.train()
    try:
        total = model(x, labels)
        logits = model.local.logits_local(model._decoder_stream(x, None, None, None)[0], False)
        byte_loss = torch.nn.functional.cross_entropy(logits.transpose(0, 1).reshape(-1, logits.shape[-1]),
                                                      labels.reshape(-1))
        entropy_loss = torch.nn.functional.cross_entropy(model.entropy(x).reshape(-1, logits.shape[-1]),
                                                         labels.reshape(-1))
        assert abs(float(total) - float(byte_loss + entropy_loss)) < 1e-4
    finally:
        model.eval()
    model(x)
    metrics = model.training_metrics()
    patches = model.patches(x)
    assert metrics["byte_latent/bridge/mean_patch_length"] == pytest.approx(96 / float(patches.count.sum()))
    assert metrics["byte_latent/bridge/compression_ratio"] == pytest.approx(48 / patches.length)


def test_is_a_byte_latent_model_below_the_test_size():
    model = model_with()
    assert isinstance(model, ByteLatentLM) and model.num_parameters() < 1_000_000


@pytest.mark.parametrize("override, expected", [
    ("byte_latent.patching=sometimes", "byte_latent.patching"),
    ("byte_latent.entropy_threshold=-1", "byte_latent.entropy_threshold"),
    ("byte_latent.stride=0", "byte_latent.stride"),
    ("byte_latent.encoder_layers=0", "byte_latent.encoder_layers"),
    ("byte_latent.sequence_type=dinosaur", "byte_latent.sequence_type"),
    ("byte_latent.entropy_loss_weight=-0.5", "byte_latent.entropy_loss_weight"),
    ("byte_latent.local_model={d_model: 0}", "byte_latent.local_model.d_model"),
    ("byte_latent.entropy_model={pattern: 'Q'}", "byte_latent.entropy_model"),
    ("byte_latent.colour=blue", "byte_latent.colour: unknown field"),
    ("byte_latent.merge_max_ratio=0.7", "byte_latent.merge_max_ratio"),
    ("byte_latent.merge_threshold=2", "byte_latent.merge_threshold"),
    ("byte_latent.merge_after=9", "byte_latent.merge_after=9 but the global model has 4 layers"),
])
def test_bad_byte_latent_fields_name_the_field(override, expected):
    from chimera.errors import UserError

    with pytest.raises(UserError) as err:
        load_model_config(PRESET, [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def merging(threshold):
    """Token merging between the global blocks, at a threshold low enough that neighbouring patches merge."""
    return model_with(f"byte_latent.entropy_threshold={threshold}", "byte_latent.token_merging=true",
                      "byte_latent.merge_threshold=0.0")


def test_token_merging_shortens_the_global_sequence_and_reports_it(merging):
    x = ids(2, 48)
    with torch.no_grad():
        merging(x)
    metrics = merging.training_metrics()
    patches = merging.patches(x)
    merged = metrics["byte_latent/global_model.merge/merged_length"]
    assert merged < float(patches.count.float().mean())  # something merged: fewer tokens than patches
    assert merged >= 0.5 * float(patches.count.float().mean())  # neighbour pairs: at most every second merged away


def test_token_merging_keeps_byte_logits_causal_and_decoding_equal_to_forward(merging):
    x = ids(2, 48, seed=3)
    t = 29
    y = x.clone()
    y[:, t] = (y[:, t] + 11) % 256
    with torch.no_grad():
        a, b = merging(x), merging(y)
    assert (a[:, :t] - b[:, :t]).abs().max() < 1e-5 and (a[:, t] - b[:, t]).abs().max() > 1e-4
    state = merging.init_state(2, 48)
    stepped = torch.stack([merging.step(x[:, s], state, s) for s in range(48)], 1)
    assert (stepped - a).abs().max() < 1e-4
    assert all(row["global"]["merges"] > 0 for row in state)  # decoding merged too


def test_token_merging_off_is_the_unmerged_model(model, threshold):
    never = model_with(f"byte_latent.entropy_threshold={threshold}", "byte_latent.token_merging=true",
                       "byte_latent.merge_threshold=1.0")
    x = ids(2, 48)
    with torch.no_grad():
        assert (never(x) - model(x)).abs().max() < 1e-5


def test_token_merging_keeps_packed_documents_apart(merging):
    """At merge_max_ratio 0.5 (the default). Below it the merge's cap counts the tokens of the whole row
    (``chimera.models.token_merging``), so an earlier document's merges change how many a later one may make."""
    first, second = ids(1, 20, seed=6), ids(1, 28, seed=7)
    segment_ids = torch.tensor([[0] * 20 + [1] * 28])
    position_ids = torch.cat([torch.arange(20), torch.arange(28)])[None]
    with torch.no_grad():
        together = merging(torch.cat([first, second], 1), segment_ids=segment_ids, position_ids=position_ids)
        assert (together[:, 20:] - merging(second)).abs().max() < 1e-4


def test_a_learned_merge_threshold_gets_a_gradient_and_decodes_like_forward():
    learned = model_with("byte_latent.patching=stride", "byte_latent.stride=2", "byte_latent.token_merging=true",
                         "byte_latent.merge_learned=true", "byte_latent.merge_threshold=0.0")
    x = ids(2, 40)
    learned.train()
    learned(x, x.roll(-1, 1)).backward()
    assert learned.global_model.merge.threshold.grad.abs().sum() > 0
    learned.eval()
    with torch.no_grad():
        full = learned(x)
    state = learned.init_state(2, 40)
    stepped = torch.stack([learned.step(x[:, t], state, t) for t in range(40)], 1)
    assert (stepped - full).abs().max() < 1e-4
