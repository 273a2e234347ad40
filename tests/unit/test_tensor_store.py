"""The tensor store: pieces written by one layout of ranks read back, whole or in any region, by any other layout."""

import re

import numpy as np
import pytest
import torch
import zarr

from chimera.trainer.tensor_store import (
    SHAPES_FILE,
    StoreReader,
    StoreWriter,
    box_numel,
    flat_range_boxes,
    full_box,
    intersect,
    write_shapes,
)

SHAPES = {
    "exp_avg/layers.0.mixer.q_proj.weight": (12, 10),
    "layers.0.conv.weight": (6, 4, 5),
    "norm.bias": (7,),
    "loss_scale": (),
}


def slices(box):
    return tuple(slice(start, stop) for start, stop in box)


def original_tensors():
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def tensor_parallel_shards(shape, dim, parts):
    """`shape` split along `dim` into `parts` contiguous shard boxes, like tensor parallelism; a scalar is one shard."""
    if not shape:
        return [()]
    bounds = np.linspace(0, shape[dim], parts + 1).round().astype(int).tolist()
    return [tuple((low, high) if d == dim else (0, extent) for d, extent in enumerate(shape))
            for low, high in zip(bounds[:-1], bounds[1:])]


def zero_partitions(numel, parts, rng):
    """[0, numel) cut at random points into `parts` contiguous flat ranges, like ZeRO partitions (some may be empty)."""
    bounds = [0, *sorted(rng.integers(0, numel + 1, parts - 1).tolist()), numel]
    return list(zip(bounds[:-1], bounds[1:]))


def random_layout(seed):
    """(name, shard_box, flat_start, flat_stop) pieces covering every tensor exactly once: a random tensor-parallel
    split (2 or 3 shards along a random dim), each shard cut into 2 or 3 ZeRO partitions."""
    rng = np.random.default_rng(seed)
    pieces = []
    for name, shape in SHAPES.items():
        dim = int(rng.integers(len(shape))) if shape else 0
        for shard in tensor_parallel_shards(shape, dim, int(rng.integers(2, 4))):
            for flat_start, flat_stop in zero_partitions(box_numel(shard), int(rng.integers(2, 4)), rng):
                pieces.append((name, shard, flat_start, flat_stop))
    return pieces


def piece_data(tensor, shard_box, flat_start, flat_stop):
    return tensor[slices(shard_box)].reshape(-1)[flat_start:flat_stop]


def write_store(path, tensors, pieces, ranks=4, missing_rank=None, chunk_elements=7):
    """Piece i is written by rank i % ranks (so each rank's array interleaves tensors); `missing_rank` never writes.
    Returns the files each rank wrote."""
    write_shapes(path, {name: tensor.shape for name, tensor in tensors.items()})
    writers = {rank: StoreWriter(path, rank, chunk_elements) for rank in range(ranks) if rank != missing_rank}
    for i, (name, shard_box, flat_start, flat_stop) in enumerate(pieces):
        if i % ranks in writers:
            writers[i % ranks].add(name, shard_box, flat_start, flat_stop,
                                   piece_data(tensors[name], shard_box, flat_start, flat_stop))
    return {rank: writer.close() for rank, writer in writers.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Boxes


def test_flat_range_boxes_example():
    # [2, 11) of a 3x4 tensor: the tail of row 0, all of row 1, the head of row 2
    assert flat_range_boxes((3, 4), 2, 11) == [((0, 1), (2, 4)), ((1, 2), (0, 4)), ((2, 3), (0, 3))]
    assert flat_range_boxes((3, 4), 4, 12) == [((1, 3), (0, 4))]
    assert flat_range_boxes((3, 4), 5, 5) == []
    assert flat_range_boxes((), 0, 1) == [()]
    with pytest.raises(ValueError):
        flat_range_boxes((3, 4), 3, 13)


@pytest.mark.parametrize("seed", range(4))
def test_flat_range_boxes_are_exactly_the_range_in_order(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        ndim = int(rng.integers(0, 5))
        shape = tuple(rng.integers(1, 6, ndim).tolist())
        numel = int(np.prod(shape))
        start, stop = sorted(rng.integers(0, numel + 1, 2).tolist())
        elements = np.arange(numel).reshape(shape)

        boxes = flat_range_boxes(shape, start, stop)

        assert len(boxes) <= max(1, 2 * ndim - 1)
        times_covered = np.zeros(shape, dtype=int)
        for box in boxes:
            assert len(box) == ndim
            assert all(0 <= low < high <= extent for (low, high), extent in zip(box, shape))
            times_covered[slices(box)] += 1
        assert times_covered.max(initial=0) <= 1  # disjoint
        in_box_order = [elements[slices(box)].reshape(-1) for box in boxes]
        np.testing.assert_array_equal(np.concatenate([np.empty(0, dtype=int), *in_box_order]),
                                      np.arange(start, stop))


def test_intersect_and_box_numel():
    assert intersect(((0, 4), (2, 6)), ((3, 8), (0, 3))) == ((3, 4), (2, 3))
    assert intersect(((0, 4), (2, 6)), ((4, 8), (0, 3))) is None
    assert intersect((), ()) == ()
    assert box_numel(((1, 4), (2, 6))) == 12
    assert box_numel(()) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.fixture
def store(tmp_path):
    tensors = original_tensors()
    files = write_store(tmp_path, tensors, random_layout(seed=0))
    return tmp_path, tensors, files


def test_reads_every_tensor_whole(store):
    path, tensors, files = store
    reader = StoreReader(path)
    assert reader.names() == sorted(SHAPES)
    for name, tensor in tensors.items():
        assert reader.shape(name) == tuple(tensor.shape)
        read = reader.read(name)
        assert read.dtype == torch.float32 and read.shape == tensor.shape
        torch.testing.assert_close(read, tensor, rtol=0, atol=0)
    # every rank reports all its files, and only its own
    written = sorted(file for rank_files in files.values() for file in rank_files)
    assert written == sorted(file for file in path.rglob("*") if file.is_file() and file.name != SHAPES_FILE)


def test_reads_random_regions(store):
    path, tensors, _ = store
    reader = StoreReader(path)
    rng = np.random.default_rng(1)
    for name, tensor in tensors.items():
        for _ in range(20):
            box = tuple(tuple(sorted(rng.integers(0, extent + 1, 2).tolist())) for extent in tensor.shape)
            torch.testing.assert_close(reader.read(name, box), tensor[slices(box)], rtol=0, atol=0)


def test_read_flat_serves_another_layout(store):
    path, tensors, _ = store
    reader = StoreReader(path)
    for name, shard_box, flat_start, flat_stop in random_layout(seed=7):
        expected = piece_data(tensors[name], shard_box, flat_start, flat_stop)
        torch.testing.assert_close(reader.read_flat(name, shard_box, flat_start, flat_stop), expected, rtol=0, atol=0)


def test_lower_precision_and_views_are_stored_as_float32(tmp_path):
    weight = torch.randn(5, 6, dtype=torch.bfloat16)
    write_shapes(tmp_path, {"w": (5, 6)})
    writer = StoreWriter(tmp_path, rank=0, chunk_elements=4)
    writer.add("w", full_box((5, 6)), 0, 30, weight.reshape(-1))
    writer.close()
    torch.testing.assert_close(StoreReader(tmp_path).read("w"), weight.float(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Coverage errors


def test_missing_rank_is_an_error_naming_the_tensor_and_region(tmp_path):
    tensors = {"layers.0.w": torch.randn(4, 3)}
    rows = [((0, 2), (0, 3)), ((2, 4), (0, 3))]  # rank 0 and rank 1's tensor-parallel shards
    write_store(tmp_path, tensors, [("layers.0.w", shard, 0, 6) for shard in rows], ranks=2, missing_rank=1)
    reader = StoreReader(tmp_path)
    torch.testing.assert_close(reader.read("layers.0.w", rows[0]), tensors["layers.0.w"][:2], rtol=0, atol=0)
    with pytest.raises(ValueError, match=re.escape("'layers.0.w': region [2:4, 0:3]")):
        reader.read("layers.0.w")


def test_missing_rank_in_a_realistic_layout(tmp_path):
    tensors = original_tensors()
    pieces = random_layout(seed=0)
    name = "exp_avg/layers.0.mixer.q_proj.weight"
    missing_rank = next(i % 4 for i, (piece_name, _, start, stop) in enumerate(pieces)
                        if piece_name == name and stop > start)
    write_store(tmp_path, tensors, pieces, ranks=4, missing_rank=missing_rank)
    with pytest.raises(ValueError, match=re.escape(repr(name)) + ".*not stored by any rank"):
        StoreReader(tmp_path).read(name)


def test_double_coverage_is_an_error_naming_the_tensor_and_region(tmp_path):
    tensors = {"layers.0.w": torch.randn(4, 3)}
    pieces = [("layers.0.w", ((0, 2), (0, 3)), 0, 6), ("layers.0.w", ((2, 4), (0, 3)), 0, 6),
              ("layers.0.w", full_box((4, 3)), 4, 8)]  # rank 2 also holds boxes [1:2, 1:3] and [2:3, 0:2]
    write_store(tmp_path, tensors, pieces, ranks=3)
    with pytest.raises(ValueError, match=re.escape("'layers.0.w': region [1:2, 1:3] is stored more than once")):
        StoreReader(tmp_path).read("layers.0.w")


def test_duplicated_piece_in_a_realistic_layout(tmp_path):
    tensors = original_tensors()
    pieces = random_layout(seed=0)
    duplicate = next(piece for piece in pieces if piece[0] == "layers.0.conv.weight" and piece[3] > piece[2])
    write_store(tmp_path, tensors, [*pieces, duplicate], ranks=len(pieces) + 1)  # the copy gets a rank of its own
    with pytest.raises(ValueError, match=re.escape("'layers.0.conv.weight'") + ".*more than once"):
        StoreReader(tmp_path).read("layers.0.conv.weight")


# ---------------------------------------------------------------------------------------------------------------------
# I/O patterns


def test_reads_only_the_rows_it_needs(tmp_path, monkeypatch):
    tensors = {"tall": torch.randn(1000, 8), "stacked": torch.randn(2, 1000, 8)}
    # "stacked" from flat element 4 on: boxes [0:1, 0:1, 4:8], [0:1, 1:1000, 0:8], [1:2, 0:1000, 0:8]
    pieces = [("tall", full_box((1000, 8)), 0, 8000), ("stacked", full_box((2, 1000, 8)), 0, 4),
              ("stacked", full_box((2, 1000, 8)), 4, 16000)]
    write_store(tmp_path, tensors, pieces, ranks=1, chunk_elements=1000)
    reader = StoreReader(tmp_path)
    elements_read = []
    read_span = StoreReader._read_span

    def counting_read_span(self, rank, start, stop):
        elements_read.append(stop - start)
        return read_span(self, rank, start, stop)

    monkeypatch.setattr(StoreReader, "_read_span", counting_read_span)

    def elements_to_read(name, box):
        elements_read.clear()
        torch.testing.assert_close(reader.read(name, box), tensors[name][slices(box)], rtol=0, atol=0)
        return sum(elements_read)

    assert elements_to_read("tall", ((500, 501), (0, 8))) <= 2 * 8
    assert elements_to_read("tall", ((500, 501), (2, 5))) <= 2 * 8
    assert elements_to_read("stacked", ((0, 1), (500, 501), (0, 8))) <= 2 * 8
    assert elements_to_read("stacked", ((1, 2), (10, 13), (0, 8))) <= 4 * 8
    assert elements_to_read("tall", full_box((1000, 8))) == 8000
    elements_read.clear()
    torch.testing.assert_close(reader.read_flat("tall", full_box((1000, 8)), 4003, 4005),
                               tensors["tall"].reshape(-1)[4003:4005], rtol=0, atol=0)
    assert sum(elements_read) <= 2 * 8


def test_writes_whole_chunks_in_order(tmp_path, monkeypatch):
    appended = []  # (array length before, elements appended)
    append = zarr.Array.append

    def recording_append(self, data, axis=0):
        appended.append((self.shape[0], len(data)))
        return append(self, data, axis)

    monkeypatch.setattr(zarr.Array, "append", recording_append)
    weight = torch.randn(3, 6)
    write_shapes(tmp_path, {"w": (3, 6)})
    writer = StoreWriter(tmp_path, rank=0, chunk_elements=7)
    for flat_start, flat_stop in [(0, 3), (3, 13), (13, 13), (13, 18)]:
        writer.add("w", full_box((3, 6)), flat_start, flat_stop, weight.reshape(-1)[flat_start:flat_stop])
    files = writer.close()

    assert appended == [(0, 7), (7, 7), (14, 4)]  # whole chunks at chunk boundaries; only the last is partial
    assert sorted(file.relative_to(tmp_path).as_posix() for file in files) == [
        "rank_00000.index.json", "rank_00000.zarr/c/0", "rank_00000.zarr/c/1", "rank_00000.zarr/c/2",
        "rank_00000.zarr/zarr.json"]
    torch.testing.assert_close(StoreReader(tmp_path).read("w"), weight, rtol=0, atol=0)


def test_writer_rejects_bad_pieces(tmp_path):
    writer = StoreWriter(tmp_path, rank=0)
    with pytest.raises(ValueError, match="needs 4 elements, got 5"):
        writer.add("w", ((0, 2), (0, 3)), 1, 5, torch.zeros(5))
    with pytest.raises(ValueError, match="not within"):
        writer.add("w", ((0, 2), (0, 3)), 4, 8, torch.zeros(4))
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.add("w", ((0, 2), (0, 3)), 0, 1, torch.zeros(1))
