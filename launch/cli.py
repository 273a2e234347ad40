"""The ``chimera`` command.

    chimera train CONFIG --run-dir DIR [--set a.b=c ...] [--nproc N] [--dry-run] [--restart | --resume-from STEP]
    chimera checkpoint verify DIR | list DIR
    chimera launch slurm CONFIG --run-dir DIR [--nodes N --gpus-per-node G --partition P --time T ...] [--dry-run]
    chimera launch status DIR | cancel DIR
    chimera models [--flops SEQ]
    chimera bench CONFIG [--layouts 1,tp2,...] [--seq-lens 1024,2048,...] [--steps N] [--warmup N] [--compare-hf]
    chimera generate RUN_DIR | --onnx EXPORT_DIR --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N
                     --temperature T --top-k K --top-p P --stop S --seed N]
    chimera serve RUN_DIR --port P [--host 127.0.0.1 --max-tokens N --max-concurrent N --max-prompt-tokens N]
    chimera import-hf HF_DIR --out DIR [--into dynamic-hybrid]
    chimera export RUN_DIR_OR_CKPT --format safetensors|hf|onnx|gguf --out DIR [--step N] [--dtype bf16|fp16|fp32]
                   [--max-len N (onnx)]
    chimera data prepare INPUT... --tokenizer T --format {webdataset,zarr} --out DIR
    chimera data train-tokenizer INPUT... --vocab-size N --out tokenizer.json
    chimera data genomic-tasks GENOME.fasta.gz... --out DIR [--window N --per-genome N --heldout F --seed S]
    chimera finetune RUN_DIR --task TASK.yaml [--out DIR]
    chimera eval RUN_DIR --suite {ppl,mqar,chomsky,longctx} [--set OPTION=VALUE ...] [--out results.json]
                 [--nproc N]
    chimera bench-arch EXPERIMENT.yaml [--full-budget] [--out DIR] [--slurm [--partition P --time T ...] [--dry-run]]
    chimera plot RUN_DIR... --out fig.png

User errors print one line and exit with code 2 (``chimera.errors`` lists the exit codes: 75 is a run stopped
early by a signal or its time limit, after saving). Heavy imports (megatron-core, DeepSpeed) happen only after
the input has been validated.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from chimera.errors import EXIT_INTERRUPTED, UserError


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
    from chimera.errors import EXIT_STOPPED
    from chimera.trainer import stopping

    cfg = load_run_config(args.config, args.set)
    in_worker = launched_rank()
    world = int(os.environ["WORLD_SIZE"]) if in_worker else args.nproc
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: must be at least 1")
    if in_worker and args.nproc not in (1, world):
        raise UserError(f"--nproc {args.nproc} inside a launched job of {world} processes; drop --nproc")
    if args.restart and args.resume_from is not None:
        raise UserError("--restart and --resume-from exclude each other; choose one")
    if args.max_restarts is not None and args.max_restarts < 0:
        raise UserError(f"--max-restarts {args.max_restarts}: must be 0 or more")
    validate_layout(cfg, world)
    if args.dry_run:
        from chimera.trainer.plan import format_plan, memory_plan

        print(format_plan(memory_plan(cfg, world), cfg))
        return 0
    stopping.install(cfg.launch.stop_signals)  # from here on a Ctrl-C or a preemption signal stops cleanly
    if not in_worker:  # once, before any rank starts: what the run directory holds and what may change
        from chimera.trainer.resumption import prepare

        resume = prepare(args.run_dir, cfg, restart=args.restart, resume_from=args.resume_from)
        if resume.finished:
            print(f"chimera: {args.run_dir} is finished: it reached step {resume.step} (train.steps="
                  f"{cfg.train.steps}); raise train.steps to train on")
            return 0
    if world > 1 and not in_worker:
        from chimera.data.loader import DataPipeline
        from chimera.launch.local import launch

        DataPipeline(cfg.data, cfg.train.micro_batch_size, cfg.train.global_batch_size)  # bad data: fail here, once
        argv = ["train", args.config, "--run-dir", args.run_dir] + [x for s in args.set for x in ("--set", s)]
        restarts = cfg.launch.max_restarts if args.max_restarts is None else args.max_restarts
        return launch(world, [sys.executable, "-m", "chimera.launch.cli", *argv], max_restarts=restarts,
                      run_dir=args.run_dir, forward=cfg.launch.stop_signals)
    if stopping.REQUEST.reason:
        return EXIT_STOPPED
    from chimera.trainer.loop import train

    try:
        result = train(cfg, args.run_dir, announce=False)  # prepare() has said what the run resumes with
    except Exception as e:
        if in_worker and _lost_peer(e):  # another rank died: the launcher says which, and restarts the run
            print(f"chimera: rank {os.environ['RANK']}: lost contact with another rank ({type(e).__name__}); "
                  "stopping", file=sys.stderr, flush=True)
            return 1
        raise
    if result["final_save_failed"]:
        raise UserError(f"training reached step {result['step']} but its checkpoint could not be written (see "
                        "above); free space or fix permissions, then run the same command again")
    return EXIT_STOPPED if result["stopped"] else 0


def _lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank is gone (gloo's closed or reset connection,
    NCCL's and torch's distributed errors, a timeout)."""
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, (dist.DistError, TimeoutError)) or any(
        s in text for s in ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out"))


def cmd_checkpoint_verify(args) -> int:
    from chimera.trainer.checkpoint import STATE, problem, step_dirs

    path = Path(args.dir)
    checkpoints = [path] if (path / STATE).is_file() or (path / "MANIFEST.json").is_file() else step_dirs(path)
    if not checkpoints:
        raise UserError(f"{args.dir!r} holds no checkpoint (neither a checkpoint nor a run directory with some)")
    bad = 0
    for ckpt in checkpoints:
        why = problem(ckpt)
        print(f"{ckpt}: {'valid' if why is None else 'INVALID: ' + why}")
        bad += why is not None
    if bad:
        raise UserError(f"{bad} of {len(checkpoints)} checkpoint(s) in {args.dir} failed verification (see above)")
    return 0


def cmd_checkpoint_list(args) -> int:
    import json

    from chimera.trainer.checkpoint import STATE, problem, step_dirs, step_of

    checkpoints = step_dirs(args.dir)
    if not checkpoints:
        raise UserError(f"{args.dir!r} holds no checkpoints (no checkpoints/step_*)")
    latest = Path(args.dir) / "checkpoints" / "latest"
    pointed = latest.read_text().strip() if latest.is_file() else None
    print(f"{'step':>9}  {'layout':<34} {'size':>10}  valid")
    for ckpt in sorted(checkpoints, key=step_of):
        try:
            state = json.loads((ckpt / STATE).read_text())
            layout = state.get("layout") or ({"weights only": True} if state.get("weights_only") else {})
            text = " ".join(f"{k[0].upper() if k != 'zero_stage' else 'ZeRO'}{v}" for k, v in layout.items()) \
                if "weights only" not in layout else "weights only"
        except (OSError, ValueError):
            text = "?"
        size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        why = problem(ckpt)
        mark = " (latest)" if ckpt.name == pointed else ""
        print(f"{step_of(ckpt):>9}  {text:<34} {size / (1 << 20):>8.1f} MB  "
              f"{'yes' if why is None else 'no: ' + why}{mark}")
    return 0


def cmd_models(args) -> int:
    from chimera.configs.loader import load_model_config, preset_names
    from chimera.models.causal_lm import meta_model
    from chimera.models.flops import flops_columns

    if args.flops is not None and args.flops < 1:
        raise UserError(f"--flops {args.flops}: give the sequence length to count at (at least 1)")
    if args.flops:
        print(f"training FLOPs (3 x forward, chimera.models.flops) at sequence length {args.flops}")
    flops_head = f" {'FLOPs/token':>12} {'GFLOPs/seq':>12}" if args.flops else ""
    print(f"{'preset':<28} {'parameters':>16}{flops_head}  pattern")
    for name in preset_names():
        cfg = load_model_config(name)
        n = meta_model(cfg).num_parameters()  # counted on the meta device: no weights, no process group
        pattern = cfg.layers if len(cfg.layers) <= 24 else cfg.layers[:21] + "..."
        flops = flops_columns(cfg, args.flops) if args.flops else ""
        print(f"{name:<28} {n:>16,}{flops}  {pattern} ({len(cfg.layers)} sublayers)")
    return 0


def cmd_bench(args) -> int:
    from chimera.launch.bench import run

    _quiet()
    return run(args)


def cmd_generate(args) -> int:
    from chimera.inference.generate import sampling_problem

    flags = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
             "top_p": "--top-p"}
    problem = sampling_problem(args.max_new_tokens, args.temperature, args.top_k, args.top_p, flags)
    if problem:
        raise UserError(problem)
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            prompts += [line for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompts-file {args.prompts_file!r} cannot be read ({e}); give a UTF-8 text file, "
                            "one prompt per line") from None
    if not prompts:
        raise UserError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    if (args.run_dir is None) == (args.onnx is None):
        raise UserError("give a RUN_DIR or --onnx EXPORT_DIR (one of them): the model to generate with")
    model, tokenizer = generation_model(args)
    ids = [tokenizer.encode(p).tolist() for p in prompts]
    if any(len(i) == 0 for i in ids):
        raise UserError("a --prompt is empty; give at least one character")
    from chimera.inference.cli import print_generations

    if args.onnx is not None:  # before any text is printed
        model.check_length(max(map(len, ids)) + args.max_new_tokens)
    print_generations(model, tokenizer, ids, args)
    return 0


def generation_model(args):
    """The model and tokenizer ``chimera generate`` samples from: a run's checkpoint (Chimera's modules) or an ONNX
    export (onnxruntime)."""
    from chimera.data.tokenizers import get_tokenizer

    if args.onnx is not None:
        from chimera.export.onnx_runtime import load_onnx_model
        from chimera.export.tokenizer_files import read_tokenizer

        model = load_onnx_model(args.onnx)
        return model, read_tokenizer(args.onnx)
    from chimera import load_model
    from chimera.trainer.checkpoint import read_config, resolve_checkpoint

    ckpt = resolve_checkpoint(args.run_dir)
    return load_model(ckpt), get_tokenizer(read_config(ckpt).data.tokenizer)


def cmd_serve(args) -> int:
    for flag, value in (("--max-tokens", args.max_tokens), ("--max-concurrent", args.max_concurrent),
                        ("--max-prompt-tokens", args.max_prompt_tokens)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: must be in 0..65535 (0: any free port)")
    from chimera.trainer.checkpoint import read_config, resolve_checkpoint

    ckpt = resolve_checkpoint(args.run_dir)
    from chimera import load_model
    from chimera.data.tokenizers import get_tokenizer
    from chimera.inference.server import Limits, serve

    tokenizer = get_tokenizer(read_config(ckpt).data.tokenizer)
    limits = Limits(args.max_tokens, args.max_concurrent, args.max_prompt_tokens)
    try:
        serve(load_model(ckpt).eval(), tokenizer, args.host, args.port, limits, Path(args.run_dir).name,
              announce=lambda line: print(line, flush=True))
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another --port "
                        "or --host") from None
    return 0


def _writable_output(path: str, flag: str = "--out") -> None:
    """``path`` (a directory the command creates) can be written: its parent exists or can be made, and takes files.
    Checked before any work, so a bad path costs nothing and leaves nothing."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UserError(f"{flag} {path!r} exists and is not a directory")
    parent = target.parent
    probe = parent / f".chimera-write-test-{os.getpid()}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {path!r} cannot be written ({e.strerror or e}); choose a writable location") \
            from None


def cmd_data_prepare(args) -> int:
    from chimera.data.prepare import prepare

    _writable_output(args.out)
    if args.shard_mb <= 0 or args.chunk_tokens < 1:
        raise UserError("--shard-mb and --chunk-tokens must be positive")
    prepare(args.inputs, args.tokenizer, args.format, args.out, on_error=args.on_error, text_field=args.text_field,
            shard_mb=args.shard_mb, chunk_tokens=args.chunk_tokens, progress=not args.quiet)
    return 0


def cmd_data_train_tokenizer(args) -> int:
    from chimera.data.prepare import train_tokenizer

    train_tokenizer(args.inputs, args.vocab_size, args.out, args.text_field)
    return 0


def cmd_data_genomic_tasks(args) -> int:
    from chimera.data.genomic_tasks import build_tasks

    _writable_output(args.out)
    build_tasks(args.genomes, args.out, window=args.window, per_genome=args.per_genome, heldout=args.heldout,
                seed=args.seed)
    return 0


def cmd_finetune(args) -> int:
    from chimera.trainer.finetune import finetune

    if args.out:
        _writable_output(args.out)
    finetune(args.run_dir, args.task, args.out)
    return 0


def cmd_import_hf(args) -> int:
    from chimera.trainer.interchange import import_hf

    _writable_output(args.out)
    out = import_hf(args.hf_dir, args.out, into=args.into)
    print(f"imported {args.hf_dir} -> {out}; continue with: chimera train {out}/run.yaml --run-dir {out}")
    return 0


def cmd_export(args) -> int:
    from chimera.export.exporter import export

    _writable_output(args.out)
    out = export(args.checkpoint, args.format, args.out, step=args.step, dtype=args.dtype, overwrite=args.overwrite,
                 max_shard_mb=args.max_shard_mb, max_len=args.max_len)
    print(f"exported ({args.format}, {args.dtype}) -> {out}")
    return 0


def launched_rank() -> bool:
    """Whether this process is one of the ranks ``chimera.launch.local`` (or torchrun, Slurm) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def cmd_eval(args) -> int:
    from chimera.evaluation.cli import run_eval

    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: must be at least 1")
    in_worker = launched_rank()
    if args.nproc > 1 and not in_worker:  # the checks once, here; then the ranks, each its share of the batches
        from chimera.evaluation.cli import check_eval
        from chimera.launch.local import launch

        check_eval(args.run_dir, args.suite, args.set, args.out)
        argv = ["eval", args.run_dir, "--suite", args.suite, *[x for s in args.set for x in ("--set", s)]]
        return launch(args.nproc, [sys.executable, "-m", "chimera.launch.cli", *argv,
                                   *(["--out", args.out] if args.out else [])])
    if in_worker and int(os.environ["WORLD_SIZE"]) > 1:
        from chimera.evaluation.ranks import join_ranks

        join_ranks()
    return run_eval(args.run_dir, args.suite, args.set, args.out)


BENCH_ARRAY_FLAGS = {flag: field for flag, field in (
    ("--gpus-per-node", "gpus_per_node"), ("--cpus-per-task", "cpus_per_task"), ("--partition", "partition"),
    ("--time", "time"), ("--account", "account"), ("--qos", "qos"), ("--constraint", "constraint"), ("--mem", "mem"),
    ("--save-before-end", "save_before_end"), ("--max-restarts", "max_restarts"))}


def launch_flags(args, names) -> dict:
    """The launch fields given as flags (``names``: their dests), ``--exclusive`` and ``--setup`` included."""
    flags = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.exclusive:
        flags["exclusive"] = True
    if args.setup:
        flags["setup"] = args.setup
    return flags


def cmd_bench_arch(args) -> int:
    from chimera.evaluation.bench import announce, bench_arch, collect, plan

    flags = launch_flags(args, BENCH_ARRAY_FLAGS.values())
    if not args.slurm:
        flag_of = {**{name: flag for flag, name in BENCH_ARRAY_FLAGS.items()}, "exclusive": "--exclusive",
                   "setup": "--setup"}
        given = (["--dry-run"] if args.dry_run else []) + [flag_of[name] for name in flags]
        if given:
            raise UserError(f"{' '.join(given)}: for a Slurm submission; add --slurm, or leave it out to run here")
        return bench_arch(args.experiment, args.out, full_budget=args.full_budget)
    from chimera.launch import bench_array

    launch = bench_array.launch_config(flags)
    p = plan(args.experiment, args.out, args.full_budget)
    if args.dry_run:
        print(bench_array.dry_run(p, launch))
        return 0
    announce(p)
    if not bench_array.pending(p):
        print("chimera: every run finished before: nothing submitted", flush=True)
        return collect(p)
    ids = bench_array.submit_experiment(p, launch)
    print(f"chimera: submitted job array {ids[0].split('_')[0]} ({len(ids) - 1} runs) and job {ids[-1]}, which writes "
          f"{p.out_dir / 'results.json'} after them; `chimera launch status {p.out_dir}` shows them")
    return 0


def cmd_plot(args) -> int:
    from chimera.evaluation.plots import plot_runs

    plot_runs(args.run_dirs, args.out)
    print(f"chimera: wrote {args.out}")
    return 0


LAUNCH_FLAGS = {  # flag -> (launch field, type)
    "--nodes": ("nodes", int), "--gpus-per-node": ("gpus_per_node", int), "--tasks-per-node": ("tasks_per_node", int),
    "--cpus-per-task": ("cpus_per_task", int), "--partition": ("partition", str), "--time": ("time", str),
    "--account": ("account", str), "--qos": ("qos", str), "--constraint": ("constraint", str), "--mem": ("mem", str),
    "--save-before-end": ("save_before_end", str), "--max-restarts": ("max_restarts", int),
}


def cmd_launch_slurm(args) -> int:
    import yaml

    from chimera.launch import slurm

    flags = launch_flags(args, [name for name, _ in LAUNCH_FLAGS.values()])
    submission = slurm.prepare(args.config, args.set, args.run_dir, flags, args.sweep, dry_run=args.dry_run)
    if args.dry_run:
        print("# sbatch script (submitted through submitit; nothing written, nothing submitted)")
        print(slurm.sbatch_script(submission.run_dir, submission.launch, len(submission.points)))
        for where, cfg in submission.points:
            print(f"# resolved config of {where}")
            print(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))
        return 0
    ids = slurm.submit(submission)
    world = submission.launch.nodes * submission.launch.ranks_per_node
    print(f"chimera: submitted job {', '.join(ids)} ({world} tasks each); logs in {args.run_dir}/slurm; "
          f"`chimera launch status {args.run_dir}` shows it")
    return 0


def cmd_launch_status(args) -> int:
    from chimera.launch import slurm

    print("\n".join(slurm.status(args.run_dir)))
    return 0


def cmd_launch_cancel(args) -> int:
    from chimera.launch import slurm

    print(f"chimera: cancelled job {', '.join(slurm.cancel(args.run_dir))}")
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
    t.add_argument("--restart", action="store_true",
                   help="start afresh in a run directory that holds a run (its files move to RUN_DIR/restarted/N)")
    t.add_argument("--resume-from", type=int, default=None, metavar="STEP",
                   help="resume from this checkpoint step (newer checkpoints move to RUN_DIR/superseded)")
    t.add_argument("--max-restarts", type=int, default=None,
                   help="with --nproc > 1: restarts from the last valid checkpoint after a rank fails "
                        "(default: launch.max_restarts)")
    t.set_defaults(func=cmd_train)

    la = sub.add_parser("launch", help="run on a cluster (Slurm)")
    lsub = la.add_subparsers(dest="launch_command", required=True, parser_class=_Parser)
    ls = lsub.add_parser("slurm", help="submit a run as a Slurm job (one task per GPU or CPU rank)")
    ls.add_argument("config", help="YAML run file; its launch: section holds the same fields as these flags")
    ls.add_argument("--run-dir", required=True)
    for flag, (name, kind) in LAUNCH_FLAGS.items():
        ls.add_argument(flag, dest=name, type=kind, default=None)
    ls.add_argument("--exclusive", action="store_true")
    ls.add_argument("--setup", action="append", default=[], metavar="SHELL", help="e.g. 'module load cuda'")
    ls.add_argument("--set", action="append", default=[], metavar="A.B=VALUE", help="override a config field")
    ls.add_argument("--sweep", action="append", default=[], metavar="A.B=V1,V2",
                    help="a job array: one run (and run directory under --run-dir) per combination")
    ls.add_argument("--dry-run", action="store_true", help="print the sbatch script and the resolved config only")
    ls.set_defaults(func=cmd_launch_slurm)
    lst = lsub.add_parser("status", help="the job's state and the run's last metrics line")
    lst.add_argument("run_dir")
    lst.set_defaults(func=cmd_launch_status)
    lc = lsub.add_parser("cancel", help="cancel the run's job")
    lc.add_argument("run_dir")
    lc.set_defaults(func=cmd_launch_cancel)

    c = sub.add_parser("checkpoint", help="inspect a run's checkpoints")
    csub = c.add_subparsers(dest="checkpoint_command", required=True, parser_class=_Parser)
    cv = csub.add_parser("verify", help="check every file of a run's checkpoints (or of one) against its manifest")
    cv.add_argument("dir", help="run directory or checkpoint directory")
    cv.set_defaults(func=cmd_checkpoint_verify)
    cl = csub.add_parser("list", help="a run's checkpoints: step, layout, size, valid?")
    cl.add_argument("dir", help="run directory")
    cl.set_defaults(func=cmd_checkpoint_list)

    m = sub.add_parser("models", help="list model presets with their parameter counts")
    m.add_argument("--flops", type=int, default=None, metavar="SEQ",
                   help="add the training FLOPs per token and per sequence at sequence length SEQ")
    m.set_defaults(func=cmd_models)

    from chimera.launch.bench import add_arguments as bench_arguments

    b = sub.add_parser("bench", help="time training steps: tokens/s, TFLOP/s, MFU, memory, scaling with length")
    bench_arguments(b)
    b.set_defaults(func=cmd_bench)

    g = sub.add_parser("generate", help="sample text from a trained run")
    g.add_argument("run_dir", nargs="?", help="run directory or checkpoint directory")
    g.add_argument("--onnx", metavar="EXPORT_DIR", help="generate with onnxruntime from a chimera export --format onnx")
    g.add_argument("--prompt", action="append", help="repeatable: several prompts decode as one batch")
    g.add_argument("--prompts-file", help="a text file, one prompt per line (with or without --prompt)")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--stop", action="append", default=[], help="repeatable: the text ends before this string")
    g.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    g.set_defaults(func=cmd_generate)
    sv = sub.add_parser("serve", help="an OpenAI-style completions server for a trained run (localhost)")
    sv.add_argument("run_dir", help="run directory or checkpoint directory")
    sv.add_argument("--port", type=int, required=True, help="0: any free port (printed)")
    sv.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    sv.add_argument("--max-tokens", type=int, default=256, help="new tokens per request, at most")
    sv.add_argument("--max-concurrent", type=int, default=8, help="requests at once; more get 429")
    sv.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts get 400")
    sv.set_defaults(func=cmd_serve)
    i = sub.add_parser("import-hf", help="a transformers checkpoint directory -> a Chimera run directory")
    i.add_argument("hf_dir")
    i.add_argument("--out", required=True, help="new run directory")
    i.add_argument("--into", choices=["dynamic-hybrid"], default=None,
                   help="convert on import: dynamic-hybrid = Granite-4.0-H's mixers as routed hybrid blocks ('Y')")
    i.set_defaults(func=cmd_import_hf)
    e = sub.add_parser("export", help="a run or checkpoint -> safetensors, transformers, ONNX or GGUF files")
    e.add_argument("checkpoint", help="run directory (newest valid checkpoint, or --step) or checkpoint directory")
    e.add_argument("--format", default="hf", help="safetensors, hf (transformers), onnx or gguf (default hf)")
    e.add_argument("--out", required=True, help="new (or empty) directory")
    e.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the newest valid)")
    e.add_argument("--dtype", default="fp32", help="bf16, fp16 or fp32 (default)")
    e.add_argument("--overwrite", action="store_true", help="replace --out (once the new export is complete)")
    e.add_argument("--max-shard-mb", type=float, default=None, help="safetensors/hf: MiB per file (default 2048)")
    e.add_argument("--max-len", type=int, default=None,
                   help="onnx: the decoding cache's length, prompt and new tokens (default: seq_len, at least 256)")
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
    dg = dsub.add_parser("genomic-tasks", help="fine-tuning tasks (species, GC, chimeric-read origin) from genomes")
    dg.add_argument("genomes", nargs="+", help="one FASTA(.gz) file per genome (its class)")
    dg.add_argument("--out", required=True, help="new directory for the tasks")
    dg.add_argument("--window", type=int, default=1000, help="bases per example")
    dg.add_argument("--per-genome", type=int, default=200, help="examples per genome and split")
    dg.add_argument("--heldout", type=float, default=0.2, help="fraction of each genome (its end) held out")
    dg.add_argument("--seed", type=int, default=0)
    dg.set_defaults(func=cmd_data_genomic_tasks)

    f = sub.add_parser("finetune", help="train task heads on a pretrained run's features; held-out metrics")
    f.add_argument("run_dir", help="a run directory or checkpoint")
    f.add_argument("--task", required=True, help="task file (YAML): tasks (data, weight), steps, lr, ...")
    f.add_argument("--out", help="directory for the results (default RUN_DIR/finetune)")
    f.set_defaults(func=cmd_finetune)

    from chimera.evaluation.names import SUITE_NAMES

    ev = sub.add_parser("eval", help="evaluate a run: ppl, mqar, chomsky or longctx; prints a table")
    ev.add_argument("run_dir", help="run directory (newest valid checkpoint), checkpoint, or imported HF run")
    ev.add_argument("--suite", required=True, choices=SUITE_NAMES)
    ev.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                    help="a suite option, e.g. seq_lens=[64,128] (YAML value)")
    ev.add_argument("--out", default=None, help="write the result as JSON here")
    ev.add_argument("--nproc", type=int, default=1, help="local ranks, each evaluating its share of the batches")
    ev.set_defaults(func=cmd_eval)
    ba = sub.add_parser("bench-arch", help="train and evaluate every (model, task, lr, seed) of an experiment")
    ba.add_argument("experiment", help="experiment file (see configs/experiments/)")
    ba.add_argument("--full-budget", action="store_true", help="train on the experiment's full token budget")
    ba.add_argument("--out", default=None, help="output directory (default: runs/bench/<experiment name>)")
    ba.add_argument("--slurm", action="store_true", help="submit the unfinished runs as a Slurm job array (and a job "
                    "that writes results.json after them) instead of running them here")
    for flag, name in BENCH_ARRAY_FLAGS.items():
        ba.add_argument(flag, dest=name, type=LAUNCH_FLAGS[flag][1], default=None)
    ba.add_argument("--exclusive", action="store_true")
    ba.add_argument("--setup", action="append", default=[], metavar="SHELL", help="e.g. 'module load cuda'")
    ba.add_argument("--dry-run", action="store_true", help="with --slurm: print the sbatch script and the runs only")
    ba.set_defaults(func=cmd_bench_arch)
    pl = sub.add_parser("plot", help="loss / val_loss / tokens-per-second curves of runs (one PNG)")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--out", required=True, help="PNG file to write")
    pl.set_defaults(func=cmd_plot)
    return p


def main(argv: list[str] | None = None) -> int:
    _quiet()
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank refuses alike: one of them says it
            print(f"chimera: error: {e}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:  # a Ctrl-C before the stop handler was installed (imports, config)
        print("chimera: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
