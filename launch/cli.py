"""The ``chimera`` command.

    chimera train CONFIG --run-dir DIR [--set a.b=c ...] [--nproc N] [--dry-run]
    chimera models
    chimera generate RUN_DIR --prompt TEXT [--max-new-tokens N --temperature T --top-k K --top-p P]
    chimera import-hf HF_DIR --out DIR
    chimera export RUN_DIR_OR_CKPT --format hf --out DIR
    chimera data prepare INPUT... --tokenizer T --format {webdataset,zarr} --out DIR
    chimera data train-tokenizer INPUT... --vocab-size N --out tokenizer.json

User errors print one line and exit with code 2. Heavy imports (megatron-core, DeepSpeed) happen
only after the input has been validated.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from chimera.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        raise UserError(f"{self.prog}: {message} (see --help)")


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("WANDB_SILENT", "true")


def cmd_train(args) -> int:
    from chimera.configs.loader import load_run_config
    from chimera.configs.schema import validate_layout
    from chimera.trainer.checkpoint import latest_checkpoint

    cfg = load_run_config(args.config, args.set)
    in_worker = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if in_worker else args.nproc
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: must be at least 1")
    if in_worker and args.nproc not in (1, world):
        raise UserError(f"--nproc {args.nproc} inside a launched job of {world} processes; drop --nproc")
    validate_layout(cfg, world)
    if args.dry_run:
        from chimera.trainer.plan import format_plan, memory_plan

        print(format_plan(memory_plan(cfg, world), cfg))
        return 0
    if os.path.exists(args.run_dir) and not os.path.isdir(args.run_dir):
        raise UserError(f"--run-dir {args.run_dir!r} exists and is not a directory")
    latest_checkpoint(args.run_dir)  # a broken checkpoint pointer fails here, before any process starts
    if world > 1 and not in_worker:
        from chimera.data.loader import DataPipeline
        from chimera.launch.local import launch

        DataPipeline(cfg.data, cfg.train.micro_batch_size, cfg.train.global_batch_size)  # bad data: fail here, once

        argv = ["train", args.config, "--run-dir", args.run_dir] + [x for s in args.set for x in ("--set", s)]
        return launch(world, [sys.executable, "-m", "chimera.launch.cli", *argv])
    from chimera.trainer.loop import train

    train(cfg, args.run_dir)
    return 0


def cmd_models(args) -> int:
    from chimera.configs.loader import load_model_config, preset_names
    from chimera.models.causal_lm import meta_model

    print(f"{'preset':<28} {'parameters':>16}  pattern")
    for name in preset_names():
        cfg = load_model_config(name)
        n = meta_model(cfg).num_parameters()  # counted on the meta device: no weights, no process group
        pattern = cfg.layers if len(cfg.layers) <= 24 else cfg.layers[:21] + "..."
        print(f"{name:<28} {n:>16,}  {pattern} ({len(cfg.layers)} sublayers)")
    return 0


def cmd_generate(args) -> int:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature}: must be >= 0 (0 is greedy)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}: must be in (0, 1]")
    from chimera.trainer.checkpoint import read_config, resolve_checkpoint

    ckpt = resolve_checkpoint(args.run_dir)
    import torch

    from chimera import load_model
    from chimera.data.tokenizers import get_tokenizer
    from chimera.trainer.generate import generate

    tokenizer = get_tokenizer(read_config(ckpt).data.tokenizer)
    ids = tokenizer.encode(args.prompt)
    if len(ids) == 0:
        raise UserError("--prompt is empty; give at least one character")
    model = load_model(ckpt)
    prompt = torch.tensor(ids, dtype=torch.long)[None, :]
    out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, vocab_limit=tokenizer.vocab_size, seed=args.seed)
    print(tokenizer.decode(out[0].tolist()))
    return 0


def cmd_data_prepare(args) -> int:
    from chimera.data.prepare import prepare

    if args.shard_mb <= 0 or args.chunk_tokens < 1:
        raise UserError("--shard-mb and --chunk-tokens must be positive")
    prepare(args.inputs, args.tokenizer, args.format, args.out, on_error=args.on_error, text_field=args.text_field,
            shard_mb=args.shard_mb, chunk_tokens=args.chunk_tokens, progress=not args.quiet)
    return 0


def cmd_data_train_tokenizer(args) -> int:
    from chimera.data.prepare import train_tokenizer

    train_tokenizer(args.inputs, args.vocab_size, args.out, args.text_field)
    return 0


def cmd_import_hf(args) -> int:
    from chimera.trainer.interchange import import_hf

    out = import_hf(args.hf_dir, args.out)
    print(f"imported {args.hf_dir} -> {out}; continue with: chimera train {out}/run.yaml --run-dir {out}")
    return 0


def cmd_export(args) -> int:
    from chimera.trainer.interchange import export_hf

    out = export_hf(args.checkpoint, args.out)
    print(f"exported -> {out} (transformers AutoModelForCausalLM.from_pretrained loads it)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="chimera", description="Distributed pretraining for hybrid sequence models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train (or resume) a run")
    t.add_argument("config", help="YAML run file (see configs/runs/)")
    t.add_argument("--run-dir", required=True,
                   help="where checkpoints and metrics go; resumes if it holds a checkpoint")
    t.add_argument("--set", action="append", default=[], metavar="A.B=VALUE", help="override a config field")
    t.add_argument("--nproc", type=int, default=1, help="local worker processes (with --dry-run: the world size)")
    t.add_argument("--dry-run", action="store_true",
                   help="print the per-rank memory plan (parameters, gradients, optimizer, activations, pipeline "
                        "bubble) for this config and --nproc ranks, and start nothing")
    t.set_defaults(func=cmd_train)

    m = sub.add_parser("models", help="list model presets with their parameter counts")
    m.set_defaults(func=cmd_models)

    g = sub.add_parser("generate", help="sample text from a trained run")
    g.add_argument("run_dir", help="run directory or checkpoint directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)
    i = sub.add_parser("import-hf", help="a transformers checkpoint directory -> a Chimera run directory")
    i.add_argument("hf_dir")
    i.add_argument("--out", required=True, help="new run directory")
    i.set_defaults(func=cmd_import_hf)
    e = sub.add_parser("export", help="a run or checkpoint -> a transformers checkpoint directory")
    e.add_argument("checkpoint", help="run directory (latest checkpoint) or checkpoint directory")
    e.add_argument("--format", choices=["hf"], default="hf")
    e.add_argument("--out", required=True, help="new directory")
    e.set_defaults(func=cmd_export)

    d = sub.add_parser("data", help="prepare datasets and tokenizers")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    dp = dsub.add_parser("prepare", help="tokenize text / JSONL(.gz) / FASTA(.gz) into shards or a zarr store")
    dp.add_argument("inputs", nargs="+", help="files or directories")
    dp.add_argument("--tokenizer", required=True, help="bytes, dna, or the path of a tokenizer.json")
    dp.add_argument("--format", required=True, choices=["webdataset", "zarr"])
    dp.add_argument("--out", required=True, help="new directory for the dataset")
    dp.add_argument("--on-error", choices=["fail", "skip"], default="fail", help="bad input: stop, or skip and count")
    dp.add_argument("--text-field", default="text", help="JSONL field holding the text")
    dp.add_argument("--shard-mb", type=float, default=256.0, help="webdataset: maximum shard size")
    dp.add_argument("--chunk-tokens", type=int, default=1 << 20, help="zarr: tokens per chunk")
    dp.add_argument("--quiet", action="store_true", help="no progress bar")
    dp.set_defaults(func=cmd_data_prepare)
    dt = dsub.add_parser("train-tokenizer", help="train a byte-level BPE on the inputs")
    dt.add_argument("inputs", nargs="+")
    dt.add_argument("--vocab-size", type=int, required=True)
    dt.add_argument("--out", required=True, help="path of the tokenizer.json to write")
    dt.add_argument("--text-field", default="text")
    dt.set_defaults(func=cmd_data_train_tokenizer)
    return p


def main(argv: list[str] | None = None) -> int:
    _quiet()
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as e:
        print(f"chimera: error: {e}", file=sys.stderr)
        return UserError.exit_code


if __name__ == "__main__":
    sys.exit(main())
