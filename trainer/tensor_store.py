"""A layout-free checkpoint store of logical tensors, written in parallel by many ranks and readable by any layout.

A *logical* tensor is a full, unsharded tensor with a name (e.g. ``exp_avg/layers.0.mixer.q_proj.weight``). A rank
holds a *shard box* of it (a rectangular region, e.g. its tensor-parallel slice) and, of that shard, possibly only a
contiguous C-order flat range (e.g. its ZeRO partition of the flattened shard): one *piece*. Every rank writes exactly
the pieces it holds, to its own files; a reader with any other layout then reads any region of any tensor, assembled
from whichever ranks' pieces overlap it (the design of ``torch.distributed.checkpoint``, stored with zarr).

A flat range is not rectangular, so at write time each piece is cut into at most ``2 * ndim - 1`` rectangular boxes
(:func:`flat_range_boxes`). A box's elements are stored contiguously in the box's C order, so a reader fetches any run
of a box's rows as one contiguous span, without reading the rest of the box.

On-disk layout, under the store directory::

    shapes.json               {name: [dim, ...]}: every logical tensor's full shape (written once, by one rank)
    rank_00003.zarr/          1-D float32 zarr (v3) array, chunked, uncompressed: the data of all of rank 3's pieces,
                              concatenated in the order they were added
    rank_00003.index.json     {"format": "chimera.tensor_store/1", "rank": 3, "data": "rank_00003.zarr", "numel": N,
                               "tensors": {name: [{"box": [[start, stop], ...], "offset": k}, ...]}}: every box of
                              rank 3's pieces, in full-tensor coordinates, and where its data starts in rank 3's array

Each rank creates and writes only its own two entries, so ranks write concurrently without coordination. A rank's
index is written last and atomically (renamed into place): a rank without an index did not finish, and reading a
region that only it held fails with an error naming that region.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

Box = tuple[tuple[int, int], ...]
"""A rectangular region of a tensor: one half-open (start, stop) pair per dim, in full-tensor coordinates."""

SHAPES_FILE = "shapes.json"
INDEX_FORMAT = "chimera.tensor_store/1"


def _data_name(rank: int) -> str:
    """The name of `rank`'s data array (a zarr directory) in the store."""
    return f"rank_{rank:05d}.zarr"


def _index_name(rank: int) -> str:
    """The name of `rank`'s index file in the store."""
    return f"rank_{rank:05d}.index.json"


# ---------------------------------------------------------------------------------------------------------------------
# Boxes


def box_shape(box: Box) -> tuple[int, ...]:
    """The shape of the sub-tensor that `box` selects."""
    return tuple(stop - start for start, stop in box)


def box_numel(box: Box) -> int:
    """The number of elements in `box` (1 for the 0-d box ``()``, a scalar's only element)."""
    return math.prod(box_shape(box))


def intersect(a: Box, b: Box) -> Box | None:
    """The region common to boxes `a` and `b`, or None if they share no element."""
    if len(a) != len(b):
        raise ValueError(f"boxes of different ndim: {a} and {b}")
    common = tuple((max(a_start, b_start), min(a_stop, b_stop)) for (a_start, a_stop), (b_start, b_stop) in zip(a, b))
    if any(start >= stop for start, stop in common):
        return None
    return common


def full_box(shape: Sequence[int]) -> Box:
    """The box covering all of a tensor of `shape`."""
    return tuple((0, int(extent)) for extent in shape)


def shift_box(box: Box, origin: Box) -> Box:
    """`box`, given relative to the sub-tensor at `origin`, in the coordinates `origin` is given in."""
    return tuple((start + base, stop + base) for (start, stop), (base, _) in zip(box, origin))


def _as_box(box: Sequence[Sequence[int]]) -> Box:
    """`box` (any sequence of pairs, e.g. from JSON) as a Box; rejects pairs with stop < start."""
    pairs = tuple((int(start), int(stop)) for start, stop in box)
    if any(stop < start for start, stop in pairs):
        raise ValueError(f"box {pairs} has a stop before its start")
    return pairs


def _check_within(box: Box, shape: tuple[int, ...], name: str) -> None:
    if len(box) != len(shape) or any(start < 0 or stop > extent for (start, stop), extent in zip(box, shape)):
        raise ValueError(f"tensor {name!r}: box {_format_box(box)} is not within its shape {list(shape)}")


def _format_box(box: Box) -> str:
    return "[" + ", ".join(f"{start}:{stop}" for start, stop in box) + "]"


def _local_slices(box: Box, origin: Box) -> tuple[slice, ...]:
    """Index of `box` within the array holding the region `origin` (both in the same coordinates)."""
    return tuple(slice(start - base, stop - base) for (start, stop), (base, _) in zip(box, origin))


def _bounding_box(mask: np.ndarray, origin: Box) -> Box:
    """The smallest box (in `origin`'s coordinates) holding every True element of `mask`, an array over `origin`."""
    where = np.argwhere(mask)
    lows, highs = where.min(axis=0), where.max(axis=0) + 1
    return tuple((base + int(low), base + int(high)) for (base, _), low, high in zip(origin, lows, highs))


def flat_range_boxes(shape: Sequence[int], start: int, stop: int) -> list[Box]:
    """The flat C-order range [start, stop) of a tensor of `shape`, as disjoint rectangular boxes (in flat order)
    whose union is exactly that range; at most 2*ndim - 1 boxes. Empty range -> []. 0-d tensors: shape () has one
    element (one box, ``()``).

    Each box's elements, in the box's own C order, are a contiguous run of the range; the boxes' runs follow each
    other in the returned order."""
    shape = tuple(int(extent) for extent in shape)
    numel = math.prod(shape)
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"flat range [{start}, {stop}) is not within a tensor of shape {list(shape)} "
                         f"({numel} elements)")
    if start == stop:
        return []
    return _nonempty_range_boxes(shape, start, stop)


def _nonempty_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """flat_range_boxes for start < stop: the partial first row, the whole rows, the partial last row ("rows" are the
    indices of dim 0); the partial rows recursively, one dim down."""
    if not shape:
        return [()]
    if len(shape) == 1:
        return [((start, stop),)]
    row_numel = math.prod(shape[1:])
    first_row, last_row = start // row_numel, (stop - 1) // row_numel

    def within_row(row: int, row_start: int, row_stop: int) -> list[Box]:
        return [((row, row + 1), *box) for box in _nonempty_range_boxes(shape[1:], row_start, row_stop)]

    if first_row == last_row:
        return within_row(first_row, start - first_row * row_numel, stop - first_row * row_numel)
    # A suffix or prefix of a row takes at most ndim - 1 boxes (one per dim below), hence 2 * ndim - 1 in all.
    head, whole_rows, tail = [], [], []
    whole_start, whole_stop = first_row, last_row + 1
    if start % row_numel:
        head = within_row(first_row, start % row_numel, row_numel)
        whole_start += 1
    if stop % row_numel:
        tail = within_row(last_row, 0, stop % row_numel)
        whole_stop -= 1
    if whole_start < whole_stop:
        whole_rows = [((whole_start, whole_stop), *full_box(shape[1:]))]
    return head + whole_rows + tail


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _write_json_atomic(path: Path, value: object) -> None:
    """Write `value` as JSON to `path` under a temporary name, then rename it: readers see all of it or nothing."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=1))
    os.replace(temporary, path)


def write_shapes(path: str | os.PathLike[str], shapes: dict[str, Sequence[int]]) -> Path:
    """Written once (by one rank): every logical tensor's full shape (a JSON file). Returns its path."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    shapes_path = directory / SHAPES_FILE
    _write_json_atomic(shapes_path, {name: [int(extent) for extent in shape] for name, shape in shapes.items()})
    return shapes_path


class StoreWriter:
    """One rank's writer. path: the store directory (created if missing; several ranks' writers share it).

    Pieces stream into the rank's zarr array through a one-chunk staging buffer that is written out whenever it is
    full, so every chunk is written once, whole (no read-modify-write), and memory stays at about one chunk.
    chunk_elements: elements per zarr chunk (float32: the default is 16 MiB)."""

    def __init__(self, path: str | os.PathLike[str], rank: int, chunk_elements: int = 1 << 22) -> None:
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
        self.path = Path(path)
        self.rank = rank
        self.path.mkdir(parents=True, exist_ok=True)
        # Grows by one whole chunk per flush. NaN fill: a chunk file lost later reads as NaN, not as plausible zeros;
        # write_empty_chunks: an all-zero chunk is still a file, so the files returned by close() are all the data.
        self._array = zarr.create_array(
            store=str(self.path / _data_name(rank)), shape=(0,), chunks=(chunk_elements,), dtype="float32",
            compressors=None, fill_value=np.nan, overwrite=True, config={"write_empty_chunks": True})
        self._staging: np.ndarray | None = np.empty(chunk_elements, dtype=np.float32)
        self._staged = 0  # elements of the staging buffer filled so far (all after the array's end)
        self._boxes: dict[str, list[dict[str, object]]] = {}  # this rank's index: name -> [{"box", "offset"}]

    @property
    def numel(self) -> int:
        """Elements added so far: the offset the next piece's data will get in this rank's array."""
        return self._array.shape[0] + self._staged

    def add(self, name: str, shard_box: Box, flat_start: int, flat_stop: int, data: torch.Tensor) -> None:
        """Append one piece (data: any float dtype, stored as float32; any device; it is copied).

        name: the logical tensor; shard_box: the region of it that this rank's shard is; [flat_start, flat_stop): the
        part of that shard, in its flattened C order, that `data` holds (flat_stop - flat_start elements)."""
        if self._staging is None:
            raise RuntimeError(f"rank {self.rank}'s writer is closed")
        shard_box = _as_box(shard_box)
        if not data.is_floating_point():
            raise TypeError(f"tensor {name!r}: piece data must be floating point, got {data.dtype}")
        if data.numel() != flat_stop - flat_start:
            raise ValueError(f"tensor {name!r}: piece [{flat_start}, {flat_stop}) of shard {_format_box(shard_box)} "
                             f"needs {flat_stop - flat_start} elements, got {data.numel()}")
        offset = self.numel
        for box in flat_range_boxes(box_shape(shard_box), flat_start, flat_stop):
            self._boxes.setdefault(name, []).append(
                {"box": [list(pair) for pair in shift_box(box, shard_box)], "offset": offset})
            offset += box_numel(box)
        self._stage(data.detach().reshape(-1))

    def _stage(self, flat: torch.Tensor) -> None:
        """Copy `flat` into the staging buffer, writing the buffer out each time it fills."""
        assert self._staging is not None
        copied = 0
        while copied < flat.numel():
            count = min(flat.numel() - copied, len(self._staging) - self._staged)
            # Converted a window at a time: a large GPU or bf16 piece never becomes a whole float32 CPU copy.
            window = flat[copied:copied + count].to(device="cpu", dtype=torch.float32)
            self._staging[self._staged:self._staged + count] = window.numpy()
            self._staged += count
            copied += count
            if self._staged == len(self._staging):
                self._write_staged()

    def _write_staged(self) -> None:
        """Append the staged elements to the array: a whole chunk, or the partial last one at close."""
        assert self._staging is not None
        if self._staged:
            self._array.append(self._staging[:self._staged])
            self._staged = 0

    def close(self) -> list[Path]:
        """Flush and write this rank's index; return the paths of every file this rank wrote (so the caller can hash
        them)."""
        if self._staging is None:
            raise RuntimeError(f"rank {self.rank}'s writer is already closed")
        self._write_staged()
        self._staging = None
        index_path = self.path / _index_name(self.rank)
        _write_json_atomic(index_path, {"format": INDEX_FORMAT, "rank": self.rank, "data": _data_name(self.rank),
                                        "numel": self.numel, "tensors": self._boxes})
        data_files = sorted(file for file in (self.path / _data_name(self.rank)).rglob("*") if file.is_file())
        return [*data_files, index_path]


# ---------------------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class _StoredBox:
    """One box of a piece, as a rank's index lists it: its data, in the box's C order, is elements
    [offset, offset + box_numel(box)) of the rank's array."""

    rank: int
    box: Box
    offset: int


class StoreReader:
    """Reads any region of any logical tensor of a store, whatever layout wrote it. path: the store directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        shapes_path = self.path / SHAPES_FILE
        if not shapes_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a tensor store: it has no {SHAPES_FILE}")
        shapes = json.loads(shapes_path.read_text())
        self._shapes: dict[str, tuple[int, ...]] = {name: tuple(shape) for name, shape in shapes.items()}
        self._stored: dict[str, list[_StoredBox]] = {name: [] for name in self._shapes}
        self._data_paths: dict[int, Path] = {}
        self._arrays: dict[int, zarr.Array] = {}  # opened on first read
        for index_path in sorted(self.path.glob("rank_*.index.json")):
            self._load_index(index_path)

    def _load_index(self, index_path: Path) -> None:
        index = json.loads(index_path.read_text())
        if index.get("format") != INDEX_FORMAT:
            raise ValueError(f"{index_path}: unknown format {index.get('format')!r} (expected {INDEX_FORMAT!r})")
        rank, rank_numel = index["rank"], index["numel"]
        self._data_paths[rank] = self.path / index["data"]
        for name, boxes in index["tensors"].items():
            if name not in self._shapes:
                raise ValueError(f"{index_path}: rank {rank} stored tensor {name!r}, which {SHAPES_FILE} lacks")
            for entry in boxes:
                stored = _StoredBox(rank, _as_box(entry["box"]), entry["offset"])
                _check_within(stored.box, self._shapes[name], name)
                if not 0 <= stored.offset <= stored.offset + box_numel(stored.box) <= rank_numel:
                    raise ValueError(f"{index_path}: tensor {name!r}: box {_format_box(stored.box)} at offset "
                                     f"{stored.offset} lies outside rank {rank}'s {rank_numel} elements")
                self._stored[name].append(stored)

    def names(self) -> list[str]:
        """Every logical tensor's name, sorted."""
        return sorted(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape of logical tensor `name`."""
        if name not in self._shapes:
            raise KeyError(f"no tensor {name!r} in the store at {self.path}")
        return self._shapes[name]

    def read(self, name: str, box: Box | None = None) -> torch.Tensor:
        """The region `box` (default: all) of a logical tensor, float32 on the CPU, assembled from whichever ranks'
        pieces overlap it. Raises ValueError (message names the tensor and the uncovered/double-covered region) if the
        pieces do not cover the region exactly once."""
        shape = self.shape(name)
        box = full_box(shape) if box is None else _as_box(box)
        _check_within(box, shape, name)
        region = np.empty(box_shape(box), dtype=np.float32)
        covered = np.zeros(box_shape(box), dtype=bool)
        for stored in self._stored[name]:
            common = intersect(stored.box, box)
            if common is None:
                continue
            target = _local_slices(common, box)
            if covered[target].any():
                overlap = _bounding_box(covered[target], common)
                raise ValueError(f"tensor {name!r}: region {_format_box(overlap)} is stored more than once "
                                 f"(rank {stored.rank}'s piece overlaps another)")
            region[target] = self._read_intersection(stored, common)
            covered[target] = True
        if not covered.all():
            missing = _bounding_box(~covered, box)
            raise ValueError(f"tensor {name!r}: region {_format_box(missing)} (the bounding box of the missing "
                             "elements) is not stored by any rank")
        return torch.from_numpy(region)

    def read_flat(self, name: str, shard_box: Box, flat_start: int, flat_stop: int) -> torch.Tensor:
        """The flat range [flat_start, flat_stop) of the sub-tensor at shard_box, as a 1-D float32 tensor (what a rank
        with that shard and ZeRO partition needs). Reads only the boxes that make up the range."""
        shard_box = _as_box(shard_box)
        _check_within(shard_box, self.shape(name), name)
        parts = [self.read(name, shift_box(box, shard_box)).reshape(-1)
                 for box in flat_range_boxes(box_shape(shard_box), flat_start, flat_stop)]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float32)

    def _read_intersection(self, stored: _StoredBox, common: Box) -> np.ndarray:
        """The elements of `common` (a non-empty region within stored.box), read from the stored box's data.

        Fetches only the run of the stored box's rows that `common` touches (one contiguous span), not the whole box.
        Rows are taken along the box's first dim wider than one: the dims before it have a single index, as in the
        head and tail boxes ([1, 1, k], [1, m, n]) that flat_range_boxes makes."""
        stored_shape = box_shape(stored.box)
        row_dim = next((dim for dim, extent in enumerate(stored_shape) if extent > 1), None)
        if row_dim is None:  # a single element
            return self._read_span(stored.rank, stored.offset, stored.offset + 1).reshape(stored_shape)
        row_numel = math.prod(stored_shape[row_dim + 1:])
        row_base = stored.box[row_dim][0]
        first_row, stop_row = common[row_dim][0] - row_base, common[row_dim][1] - row_base
        span = self._read_span(stored.rank, stored.offset + first_row * row_numel, stored.offset + stop_row * row_numel)
        rows = span.reshape(stored_shape[:row_dim] + (stop_row - first_row,) + stored_shape[row_dim + 1:])
        within_rows = _local_slices(common[row_dim + 1:], stored.box[row_dim + 1:])
        return rows[(slice(None),) * (row_dim + 1) + within_rows]

    def _read_span(self, rank: int, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of `rank`'s array: every read of stored data goes through here."""
        if rank not in self._arrays:
            self._arrays[rank] = zarr.open_array(str(self._data_paths[rank]), mode="r")
        return self._arrays[rank][start:stop]
