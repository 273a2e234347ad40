"""``chimera data genomic-tasks``: fine-tuning tasks cut from real genomes, one FASTA(.gz) file per genome.

Each genome is one class (its file name); its records (chromosome, plasmids) are joined in file order. The first
``1 - heldout`` of each genome's bases is its training region, the rest its held-out region: a held-out window
never shares a base with a training window. Three tasks, every label read off the genomes themselves:

* ``species`` (sequence classification): a window of ``window`` bases -> the genome it was cut from.
* ``gc`` (regression): the same windows -> their GC fraction (G and C among the window's A, C, G, T).
* ``origin`` (token classification): a chimeric read - a window of one genome whose tail from a cut point on is
  replaced by a window of another genome (cut drawn in the middle half) -> each base's genome of origin.

Written to ``OUT/<task>/{train,heldout}.npz`` (``input_ids`` in the ``dna`` tokenizer's ids, uint8 ``[n, window]``;
``labels``: ``[n]`` classes, ``[n]`` floats, ``[n, window]`` classes) beside ``OUT/<task>/task.json`` (kind, classes,
where the labels come from, the regions), and ``OUT/finetune.yaml``, a task file for ``chimera finetune`` naming all
three. Windows are drawn from ``numpy.random.default_rng(seed)``: the same inputs and seed give the same files.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import yaml

from chimera.data.tokenizers import DNATokenizer
from chimera.errors import UserError

TASKS = ("species", "gc", "origin")


def read_genome(path: Path) -> np.ndarray:
    """A FASTA(.gz) file's records joined, as ``dna`` token ids; IUPAC ambiguity codes (R, Y, ...) become N."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="ascii", errors="replace") as f:
            text = "".join(line.strip() for line in f if not line.startswith(">"))
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot be read as FASTA ({e})") from None
    text = re.sub(r"[^ACGTNacgtn]", "N", text)
    if not text:
        raise UserError(f"{path}: holds no sequence; pass one FASTA(.gz) file per genome")
    return DNATokenizer().encode(text).astype(np.uint8)


def genome_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".fasta", ".fa", ".fna"):
        name = name.removesuffix(suffix)
    return name


def gc_fraction(ids: np.ndarray) -> np.ndarray:
    """GC fraction of each row of ``[n, L]`` dna ids among its A/C/G/T bases (N left out)."""
    acgt = ids < 4
    gc = (ids == 1) | (ids == 2)  # C, G
    return (gc.sum(-1) / np.maximum(acgt.sum(-1), 1)).astype(np.float32)


def regions(length: int, heldout: float) -> dict[str, tuple[int, int]]:
    cut = int(round(length * (1 - heldout)))
    return {"train": (0, cut), "heldout": (cut, length)}


def draw_windows(rng, genome: np.ndarray, region: tuple[int, int], window: int, count: int) -> np.ndarray:
    lo, hi = region
    starts = rng.integers(lo, hi - window + 1, size=count)
    return genome[starts[:, None] + np.arange(window)]


def build_tasks(inputs: list[str], out: str, *, window: int = 1000, per_genome: int = 200, heldout: float = 0.2,
                seed: int = 0) -> dict:
    if window < 8:
        raise UserError(f"--window {window}: must be at least 8 bases")
    if per_genome < 1:
        raise UserError(f"--per-genome {per_genome}: must be at least 1")
    if not 0 < heldout < 1:
        raise UserError(f"--heldout {heldout}: must be in (0, 1)")
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise UserError(f"{p}: no such FASTA file; pass one FASTA(.gz) file per genome")
    if len(paths) < 2:
        raise UserError(f"{len(paths)} genome(s) given; the tasks tell genomes apart, pass at least 2 FASTA files")
    names = [genome_name(p) for p in paths]
    if len(set(names)) != len(names):
        raise UserError(f"two genome files share a name ({names}); rename one")
    out_dir = Path(out)
    if out_dir.exists():
        raise UserError(f"--out {out!r} already exists; choose a new directory or remove it")
    genomes = [read_genome(p) for p in paths]
    for p, g in zip(paths, genomes):
        if min(regions(len(g), heldout)["heldout"][1] - regions(len(g), heldout)["heldout"][0],
               regions(len(g), heldout)["train"][1]) < window:
            raise UserError(f"{p}: {len(g):,} bases leave a region shorter than --window {window} "
                            f"(--heldout {heldout}); lower --window")
    rng = np.random.default_rng(seed)
    classes = names
    region_note = (f"train: the first {1 - heldout:.0%} of each genome's bases, held out: the rest "
                   "(no window crosses the cut)")
    arrays: dict[str, dict[str, dict]] = {t: {} for t in TASKS}
    for split in ("train", "heldout"):
        windows, species = [], []
        for g, genome in enumerate(genomes):
            windows.append(draw_windows(rng, genome, regions(len(genome), heldout)[split], window, per_genome))
            species.append(np.full(per_genome, g, dtype=np.int64))
        ids, species = np.concatenate(windows), np.concatenate(species)
        arrays["species"][split] = {"input_ids": ids, "labels": species}
        arrays["gc"][split] = {"input_ids": ids, "labels": gc_fraction(ids)}
        # chimeric reads: the head of one genome's window, the tail of another's
        n = len(ids)
        other = (species + rng.integers(1, len(genomes), size=n)) % len(genomes)  # never the same genome
        tails = np.stack([draw_windows(rng, genomes[o], regions(len(genomes[o]), heldout)[split], window, 1)[0]
                          for o in other])
        cut = rng.integers(window // 4, 3 * window // 4 + 1, size=n)
        tail = np.arange(window)[None, :] >= cut[:, None]
        arrays["origin"][split] = {"input_ids": np.where(tail, tails, ids),
                                   "labels": np.where(tail, other[:, None], species[:, None]).astype(np.int64)}
    described = {
        "species": {"kind": "sequence_classification", "classes": classes,
                    "labels": "the genome (FASTA file) each window was cut from"},
        "gc": {"kind": "regression", "labels": "GC fraction of the window's A/C/G/T bases, counted from the sequence"},
        "origin": {"kind": "token_classification", "classes": classes,
                   "labels": "per base, the genome it was cut from: the read is one genome's window up to a cut "
                             "point (drawn in the middle half) and another genome's window after it"},
    }
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for task in TASKS:
            (tmp / task).mkdir(parents=True)
            for split, data in arrays[task].items():
                np.savez_compressed(tmp / task / f"{split}.npz", **{k: v for k, v in data.items()})
            meta = {"task": task, **described[task], "window": window, "genomes": [str(p) for p in paths],
                    "regions": region_note, "seed": seed,
                    "examples": {s: len(d["labels"]) for s, d in arrays[task].items()}}
            (tmp / task / "task.json").write_text(json.dumps(meta, indent=1))
        spec = {"tasks": [{"data": str(out_dir.resolve() / t), "weight": 1.0} for t in TASKS]}
        (tmp / "finetune.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"genomic tasks from {len(paths)} genomes ({sum(map(len, genomes)):,} bases), windows of {window} -> {out}: "
          + ", ".join(f"{t} ({len(arrays[t]['train']['labels'])} train / {len(arrays[t]['heldout']['labels'])} "
                      "held out)" for t in TASKS))
    return described
