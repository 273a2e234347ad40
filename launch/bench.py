"""``chimera bench CONFIG``: how fast a run's model trains, over sequence lengths and parallel layouts.

    chimera bench CONFIG [--set a.b=c ...] [--layouts 1,tp2,dp2,tp2xdp2] [--seq-lens 1024,2048,...]
                  [--tokens N] [--steps N] [--warmup N] [--compare-hf] [--json OUT]

``CONFIG`` is a run file or a model preset's name (then ``configs/runs/tiny.yaml`` with that model). Each point
(layout, length) is a real training run in fresh processes: the trainer's whole path (DeepSpeed engine, data
pipeline, the run's precision), ``--warmup`` untimed steps, then ``--steps`` timed ones, their median reported.
Every length trains the same tokens per step (``--tokens``, default the run's ``global_batch_size x seq_len``) as
``tokens / L`` sequences. Reported: step time, tokens/s, TFLOP/s per device and MFU (``chimera.models.flops``
against ``chimera.trainer.device_peak``), peak memory (the largest over ranks: the accelerator's allocated peak,
else the process's resident set), and per layout the scaling exponent ``alpha``: the least-squares slope of
log(time per sequence) over log(L), 1 for a model linear in the length, 2 for one quadratic in it.

A layout is ``1`` (one process) or sizes joined by ``x``: ``tpN`` (tensor), ``ppN`` (pipeline), ``cpN``
(context), ``dpN`` (data); its processes are local ranks (``chimera.launch.local``).

``--compare-hf`` times transformers' implementation of the same model beside Chimera's, with the same weights
(transformers' initialisation imported through the HF mapping, so both compute the same function): forward,
backward and an AdamW step of each model on the same batch, the two alternating step by step (A B A B ...) so a
change in machine load hits both alike; both in fp32, one process, the model modules themselves (no engine).
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

from chimera.errors import UserError

LAYOUT_PART = re.compile(r"(tp|pp|cp|dp)([1-9][0-9]*)")
LAYOUT_FIELDS = {"tp": "tensor", "pp": "pipeline", "cp": "context", "dp": "data"}


# ---- input -------------------------------------------------------------------------------------------------------


def parse_layout(text: str) -> dict[str, int]:
    """``tp2xdp2`` -> ``{"tensor": 2, "data": 2}``; ``1`` -> ``{}``."""
    if text.strip() == "1":
        return {}
    sizes = {}
    for part in text.strip().split("x"):
        match = LAYOUT_PART.fullmatch(part)
        if not match or LAYOUT_FIELDS[match[1]] in sizes:
            raise UserError(f"--layouts: {text!r} is not a layout; write 1, or sizes joined by 'x' from tpN, ppN, "
                            "cpN, dpN (each at most once), e.g. tp2xdp2")
        sizes[LAYOUT_FIELDS[match[1]]] = int(match[2])
    return sizes


def processes(layout: dict[str, int]) -> int:
    return math.prod(layout.values()) if layout else 1


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(n) for n in text.split(",")]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 2 or len(set(lengths)) != len(lengths):
        raise UserError(f"--seq-lens {text!r}: give distinct sequence lengths of at least 2, comma-separated "
                        "(e.g. 1024,2048,4096)")
    return sorted(lengths)


def run_config(config: str, overrides: list[str]):
    """The run of ``config`` (a run file, or a preset's name on the tiny run) with ``overrides``."""
    from chimera.configs.loader import load_run_config, preset_names

    if not Path(config).is_file() and config in preset_names():
        base = resources.files("chimera.configs") / "runs" / "tiny.yaml"
        return load_run_config(str(base), [f"model={config}", *overrides])
    if not Path(config).is_file():
        raise UserError(f"CONFIG {config!r} is neither a run file nor a model preset; pass a YAML run file or one "
                        "of `chimera models`")
    return load_run_config(config, overrides)


# ---- measuring ---------------------------------------------------------------------------------------------------


@dataclass
class Point:
    """One measured (layout, length)."""

    layout: str
    seq_len: int
    sequences: int  # per step
    step_s: float  # median
    peak_memory_gib: float
    flops_per_token: float | None  # training FLOPs per token (chimera.models.flops)
    devices: int
    peak_flops: float  # one device's peak FLOP/s
    peak_source: str

    @property
    def tokens_per_s(self) -> float:
        return self.sequences * self.seq_len / self.step_s

    @property
    def tflops(self) -> float | None:
        """Model TFLOP/s per device."""
        if self.flops_per_token is None:
            return None
        return self.flops_per_token * self.tokens_per_s / self.devices / 1e12

    @property
    def mfu(self) -> float | None:
        return None if self.tflops is None else self.tflops * 1e12 / self.peak_flops


def point_overrides(layout: dict[str, int], seq_len: int, tokens: int, steps: int, warmup: int) -> list[str]:
    """The run's fields for one point: ``tokens / seq_len`` sequences per step, all on the data-parallel ranks."""
    dp = layout.get("data", 1)
    per_rank = max(1, tokens // seq_len // dp)
    fields = {"data.seq_len": seq_len, "train.micro_batch_size": per_rank, "train.global_batch_size": per_rank * dp,
              "train.steps": warmup + steps, "train.warmup_steps": 0, "train.eval_every": 0,
              "checkpoint.every": 0, "logging.wandb": "disabled", "logging.progress": False,
              "logging.rank_stats_every": 0}
    fields.update({f"parallel.{k}": v for k, v in layout.items()})
    return [f"{k}={v}" for k, v in fields.items()]


def worker(spec_file: str) -> None:
    """One rank of one point: build the trainer, run the steps, rank 0 writes the result."""
    import torch
    import torch.distributed as dist

    from chimera.trainer.loop import Trainer
    from chimera.trainer.watchdog import peak_memory_gib

    spec = json.loads(Path(spec_file).read_text())
    cfg = run_config(spec["config"], spec["overrides"])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir, announce=False)
        for _ in range(spec["warmup"]):
            trainer.train_step()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(spec["steps"]):
            dist.barrier()
            start = time.perf_counter()
            trainer.train_step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        memory = torch.tensor([peak_memory_gib()], dtype=torch.float64)
        dist.all_reduce(memory.cuda() if dist.get_backend() == "nccl" else memory, op=dist.ReduceOp.MAX)
        if trainer.is_main:
            rate = trainer.flops_rate
            point = Point(spec["layout"], cfg.data.seq_len, cfg.train.global_batch_size, statistics.median(times),
                          float(memory), rate.flops_per_token(cfg.data.seq_len), trainer.topo.world_size,
                          rate.peak.flops_per_s, rate.peak.source)
            Path(spec["out"]).write_text(json.dumps(asdict(point)))


def measure(config: str, overrides: list[str], layout_text: str, seq_len: int, tokens: int, steps: int,
            warmup: int) -> Point:
    """One point, in fresh processes (so its peak memory is its own)."""
    from chimera.launch.local import launch

    layout = parse_layout(layout_text)
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "point.json"
        spec.write_text(json.dumps({"config": config, "layout": layout_text, "steps": steps, "warmup": warmup,
                                    "overrides": overrides + point_overrides(layout, seq_len, tokens, steps, warmup),
                                    "out": str(out)}))
        code = launch(processes(layout), [sys.executable, "-m", "chimera.launch.bench", "--worker", str(spec)])
        if code != 0 or not out.is_file():
            raise RuntimeError(f"bench: the run of layout {layout_text} at length {seq_len} failed (exit {code})")
        return Point(**json.loads(out.read_text()))


def fit_exponent(lengths: list[float], seconds: list[float]) -> float:
    """The least-squares slope of log(seconds) over log(length)."""
    xs, ys = [math.log(n) for n in lengths], [math.log(t) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def sequence_exponent(points: list[Point]) -> float:
    """The scaling exponent of time per sequence over the sequence length."""
    return fit_exponent([p.seq_len for p in points], [p.step_s / p.sequences for p in points])


# ---- transformers side by side -----------------------------------------------------------------------------------


def interleaved_step_times(steps: int, *runs, warmup: int = 1) -> list[float]:
    """Median seconds per step of each run, the runs alternating step by step (A B A B ...), so a change in machine
    load during the measurement hits all of them alike."""
    for _ in range(warmup):
        for run in runs:
            run()
    times = [[] for _ in runs]
    for _ in range(steps):
        for run, bucket in zip(runs, times):
            start = time.perf_counter()
            run()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def hf_pair(cfg, hf=None):
    """(transformers' model of ``cfg``, Chimera's with the same weights), fp32, one process; ``hf``: a transformers
    model of ``cfg`` already built (else one is made from the mapping's ``config_to_hf``)."""
    import transformers

    from chimera.models.causal_lm import meta_model
    from chimera.models.hf import ARCHITECTURES, import_state, read_hf_tensors
    from chimera.parallel.sharding import load_full_state_dict

    if cfg.family not in ARCHITECTURES:
        raise UserError(f"--compare-hf: model {cfg.name!r} (family {cfg.family!r}) has no transformers counterpart; "
                        f"those with one: {', '.join(sorted(ARCHITECTURES))}")
    mapping = ARCHITECTURES[cfg.family]
    if hf is None:
        fields = {k: v for k, v in mapping.config_to_hf(cfg).items() if k not in ("architectures", "model_type")}
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(mapping.MODEL_TYPE,
                                                                                             **fields))
    hf = hf.float()
    ours = meta_model(cfg)
    with tempfile.TemporaryDirectory() as tmp:  # the names on disk, which the mappings read (experts unfused)
        hf.save_pretrained(tmp)
        state = read_hf_tensors(Path(tmp))
    load_full_state_dict(ours, import_state(mapping, state, cfg, cfg.family))
    return hf, ours


@dataclass
class Comparison:
    seq_len: int
    batch: int
    hf_step_s: float
    chimera_step_s: float
    reference_step_s: float | None = None  # Chimera with model.kernels=reference, where timed beside

    @property
    def speedup(self) -> float:
        """transformers' step time over Chimera's."""
        return self.hf_step_s / self.chimera_step_s


def compare_hf(cfg, batch: int, seq_len: int, steps: int, warmup: int = 1, pair=None,
               reference_too: bool = False) -> Comparison:
    """Interleaved training-step times of transformers' and Chimera's implementation of model ``cfg``;
    ``reference_too``: and of Chimera's with ``model.kernels=reference`` (the same weights), in the same rotation, so
    that the fast paths' own gain is measured under the same machine load."""
    import torch

    hf, ours = pair or hf_pair(cfg)
    models = [ours]
    if reference_too:
        reference = type(cfg).model_validate({**cfg.model_dump(), "kernels": "reference"})  # sublayers re-derived
        models.append(hf_pair(reference, hf)[1])
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    hf_opt = torch.optim.AdamW(hf.parameters())

    def hf_step():
        hf_opt.zero_grad()
        hf(input_ids=ids, labels=ids).loss.backward()  # transformers shifts the labels itself
        hf_opt.step()

    def step_of(model):
        opt = torch.optim.AdamW(model.parameters())

        def step():
            opt.zero_grad()
            model(ids, labels=labels).backward()
            opt.step()
        return step

    t_hf, *t_ours = interleaved_step_times(steps, hf_step, *map(step_of, models), warmup=warmup)
    return Comparison(seq_len, batch, t_hf, t_ours[0], t_ours[1] if reference_too else None)


# ---- the command -------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("config", help="a YAML run file, or a model preset's name")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=c",
                        help="override a field of the run (repeatable)")
    parser.add_argument("--layouts", default="1", help="comma-separated layouts: 1, or e.g. tp2, dp2, tp2xdp2")
    parser.add_argument("--seq-lens", default=None, help="comma-separated sequence lengths (default: the run's)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per step at every length "
                        "(default: the run's global_batch_size x seq_len)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per point (their median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--compare-hf", action="store_true", help="time transformers' implementation beside ours")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:,.1f}"


def _optional(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def run(args) -> int:
    if args.steps < 1 or args.warmup < 0:
        raise UserError(f"--steps {args.steps} --warmup {args.warmup}: need at least 1 timed step and no negative "
                        "warm-up")
    if args.tokens is not None and args.tokens < 2:
        raise UserError(f"--tokens {args.tokens}: must be at least 2")
    cfg = run_config(args.config, args.overrides)
    lengths = parse_lengths(args.seq_lens) if args.seq_lens else [cfg.data.seq_len]
    tokens = args.tokens or cfg.train.global_batch_size * cfg.data.seq_len
    layouts = [text.strip() for text in args.layouts.split(",")]
    from chimera.configs.schema import validate_layout

    for text in layouts:  # every point's run is checked before any starts
        layout = parse_layout(text)
        for n in lengths:
            point_cfg = run_config(args.config, args.overrides + point_overrides(layout, n, tokens, args.steps,
                                                                                 args.warmup))
            validate_layout(point_cfg, processes(layout))
    if args.compare_hf:
        hf_pair_checked = hf_pair(cfg.model)  # refuses a model without a transformers counterpart, before any run

    print(f"chimera bench: {cfg.model.name}, {cfg.train.precision}, {tokens:,} tokens per step, median of "
          f"{args.steps} steps after {args.warmup} warm-up", flush=True)
    points = [measure(args.config, args.overrides, text, n, tokens, args.steps, args.warmup)
              for text in layouts for n in lengths]
    # Each point's processes measured the peak again, and a measured peak only errs low (``device_peak``): the
    # table's MFU is against the best of them, one figure for all its rows.
    best = max(points, key=lambda p: p.peak_flops)
    points = [replace(p, peak_flops=best.peak_flops, peak_source=best.peak_source) for p in points]
    print(f"peak: {points[0].peak_flops / 1e12:.3g} TFLOP/s per device ({points[0].peak_source})")
    print("| layout | seq len | sequences | step ms | tokens/s | TFLOP/s | MFU | peak memory GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for p in points:
        mfu = None if p.mfu is None else 100 * p.mfu
        print(f"| {p.layout} | {p.seq_len} | {p.sequences} | {_ms(p.step_s)} | {p.tokens_per_s:,.0f} | "
              f"{_optional(p.tflops, '.4g')} | {_optional(mfu, '.2f')}% | {p.peak_memory_gib:.3f} |")
    exponents = {}
    if len(lengths) > 1:
        print("\nscaling: time per sequence ~ L^alpha (least squares over log-log)")
        print("| layout | " + " | ".join(f"ms/seq @{n}" for n in lengths) + " | alpha |")
        print("|---|" + "---:|" * (len(lengths) + 1))
        for text in layouts:
            mine = [p for p in points if p.layout == text]
            exponents[text] = sequence_exponent(mine)
            print(f"| {text} | " + " | ".join(_ms(p.step_s / p.sequences) for p in mine) +
                  f" | {exponents[text]:.3f} |")
    comparisons = []
    if args.compare_hf:
        print("\ntransformers vs Chimera: forward + backward + AdamW, same weights, fp32, one process, interleaved")
        print("| seq len | batch | transformers ms/step | Chimera ms/step | HF / Chimera |")
        print("|---:|---:|---:|---:|---:|")
        for n in lengths:
            c = compare_hf(cfg.model, max(1, tokens // n), n, args.steps, warmup=max(1, args.warmup),
                           pair=hf_pair_checked)
            comparisons.append(c)
            print(f"| {n} | {c.batch} | {_ms(c.hf_step_s)} | {_ms(c.chimera_step_s)} | {c.speedup:.2f}x |",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "points": [asdict(p) | {"tokens_per_s": p.tokens_per_s, "tflops": p.tflops, "mfu": p.mfu}
                       for p in points],
            "exponents": exponents,
            "compare_hf": [asdict(c) | {"speedup": c.speedup} for c in comparisons]}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        warnings.filterwarnings("ignore")  # the libraries' import-time notices; the command prints the results
        worker(sys.argv[2])
