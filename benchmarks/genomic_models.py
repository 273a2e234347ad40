"""Hyena-GLT against a byte-level Hyena (no patching) and a transformer, on the same real genomes, in one run.

Each model is pretrained through `chimera train` on the same bytes for the same steps (the training regions of the
genomes: the first 80 % of each, cut into 8 kbp records, zarr, ``packing: boundaries``), then fine-tuned through
`chimera finetune` on the same tasks (`chimera data genomic-tasks`: species of origin and GC fraction of windows
from the held-out last 20 %, which pretraining never saw). Reported per model: parameters, training tokens/s
(mean after the first steps), the last validation loss in bits per base, held-out species accuracy and MCC, GC
Pearson r. The models' ratios to the first one hold on a noisy machine: they run one after the other, in this run.

usage: python benchmarks/genomic_models.py [--presets a,b,c] [--genomes 4] [--steps N] [--seq-len N] [--batch N]
       [--window N] [--per-genome N] [--finetune-steps N] [--work DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from chimera_cli import chimera  # noqa: E402  (benchmarks/, the script's folder)
from realdata import bacterial_genomes  # noqa: E402  (tests/: fetches the Debian ragout-examples genomes)

from chimera.data.genomic_tasks import regions  # noqa: E402

RECORD = 8000
CHOSEN = ("S.Aureus/COL", "H.Pylori/G27", "V.Cholerae/H1", "E.Coli/MG1655-K12")


def bases(path: Path) -> str:
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    return "".join(line.strip() for line in lines if not line.startswith(">"))


def pretraining_data(genomes: dict[str, Path], work: Path, heldout: float) -> Path:
    """The genomes' training regions as 8 kbp FASTA records, prepared to a byte-level zarr store."""
    fasta = work / "train_regions.fa"
    with open(fasta, "w") as f:
        for name, path in genomes.items():
            seq = bases(path)
            start, stop = regions(len(seq), heldout)["train"]
            for i in range(start, stop - RECORD + 1, RECORD):
                f.write(f">{name}:{i}\n{seq[i:i + RECORD]}\n")
    chimera("data", "prepare", fasta, "--tokenizer", "bytes", "--format", "zarr", "--out", work / "zarr", "--quiet")
    return work / "zarr"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="hyena-glt-tiny,hyena-tiny,transformer-tiny")
    parser.add_argument("--genomes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--per-genome", type=int, default=100)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--work", default=None, help="working directory (default: a new temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="chimera-genomic-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    found, real = bacterial_genomes()
    names = [n for n in CHOSEN if n in found][: args.genomes] or sorted(found)[: args.genomes]
    genomes = {n: found[n] for n in names}
    heldout = 0.2
    store = pretraining_data(genomes, work, heldout)
    chimera("data", "genomic-tasks", *genomes.values(), "--out", work / "tasks", "--window", args.window,
            "--per-genome", args.per_genome, "--heldout", heldout)
    task_file = work / "tasks.yaml"
    task_file.write_text(f"tasks:\n- {{data: '{work / 'tasks/species'}', weight: 1.0}}\n"
                         f"- {{data: '{work / 'tasks/gc'}', weight: 1.0}}\n"
                         f"steps: {args.finetune_steps}\nbatch_size: 16\nlr: 0.001\n")
    rows = []
    for preset in args.presets.split(","):
        run = work / preset
        chimera("train", REPO / "configs/runs/tiny.yaml", "--run-dir", run, "--set", f"model.preset={preset}",
                "--set", f"data.sources=[{{type: zarr, path: '{store}'}}]", "--set", "data.packing=boundaries",
                "--set", f"data.seq_len={args.seq_len}", "--set", f"train.steps={args.steps}",
                "--set", f"train.micro_batch_size={args.batch}", "--set", f"train.global_batch_size={args.batch}",
                "--set", "train.lr=0.003", "--set", "train.warmup_steps=10", "--set", f"train.eval_every={args.steps}",
                "--set", "logging.progress=false")
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steady = [r["tokens_per_s"] for r in metrics if "tokens_per_s" in r][3:]
        val = [r["val_loss"] for r in metrics if "val_loss" in r][-1]
        params = int(chimera("models").stdout.split(preset, 1)[1].split()[0].replace(",", ""))
        chimera("finetune", run, "--task", task_file, "--out", run / "finetune")
        species = json.loads((run / "finetune/species.json").read_text())
        gc = json.loads((run / "finetune/gc.json").read_text())
        rows.append((preset, params, sum(steady) / len(steady), val / 0.6931471805599453,
                     species["heldout"]["accuracy"], species["heldout"]["mcc"], species["baseline"]["accuracy"],
                     gc["heldout"]["pearson_r"]))
    import torch

    print(f"# {date.today()} | {platform.processor() or platform.machine()} | torch {torch.__version__} | threads "
          f"{torch.get_num_threads()} | {len(genomes)} {'real' if real else 'GENERATED stand-in'} genomes "
          f"({', '.join(genomes)}), {args.steps} steps x {args.batch} x {args.seq_len} bytes, fine-tuning "
          f"{args.finetune_steps} steps on {args.window}-base windows")
    print("| model | parameters | train tok/s | vs first | val bits/base | species acc (majority) | species MCC "
          "| GC r |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    first = rows[0][2]
    for preset, params, tps, bits, acc, mcc, majority, r in rows:
        print(f"| {preset} | {params:,} | {tps:,.0f} | {tps / first:.2f}x | {bits:.3f} | {acc:.3f} ({majority:.2f}) "
              f"| {mcc:.3f} | {r:.3f} |")


if __name__ == "__main__":
    main()
