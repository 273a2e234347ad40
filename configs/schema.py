"""The typed run configuration: one YAML file describes a run.

Every section forbids unknown keys, so a typo is an error that names the field path. ``model:`` is
``chimera.models.config.ModelConfig``, assembled from the fields each sublayer kind declares in its
own file. Checks that need more than one section (a TP size that divides what it splits, a batch
that divides over ranks) live in ``validate_layout``, which runs before any process starts.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from chimera.configs.section import Section
from chimera.errors import UserError
from chimera.models.config import ModelConfig

__all__ = ["ModelConfig", "RunConfig", "DataConfig", "TrainConfig", "ParallelConfig", "CheckpointConfig",
           "LoggingConfig", "LaunchConfig", "Curriculum", "validate_layout", "accumulation_steps", "parse_duration"]


class BuiltinSourceConfig(Section):
    """The interpreter's standard-library sources (present on every machine)."""

    type: Literal["builtin"] = "builtin"
    name: str = "builtin"
    weight: float = Field(1.0, gt=0)
    include_tests: bool = Field(False, description="include the stdlib's test/ folders")


class WebDatasetSourceConfig(Section):
    """Tar shards written by `chimera data prepare --format webdataset`."""

    type: Literal["webdataset"]
    name: str | None = None
    path: str = Field(..., description="the prepared dataset directory (or its manifest.json)")
    urls: str | None = Field(None, description="brace pattern of shard URLs (e.g. pipe:...) in manifest order")
    weight: float = Field(1.0, gt=0)
    cache_shards: int = Field(4, ge=1, description="shards kept in memory after reading")
    prefetch_shards: int = Field(2, ge=0, description="shards read ahead in the background (0: on demand)")
    read_attempts: int = Field(4, ge=1, description="tries of a remote shard read (pipe:, http, s3, gs)")
    retry_delay: float = Field(0.5, ge=0, description="seconds before the second try, doubling after")


class ZarrSourceConfig(Section):
    """A token store written by `chimera data prepare --format zarr`."""

    type: Literal["zarr"]
    name: str | None = None
    path: str
    weight: float = Field(1.0, gt=0)


class SyntheticSourceConfig(Section):
    """A generated task (chimera.data.synthetic): MQAR or a Chomsky-hierarchy task."""

    type: Literal["synthetic"]
    name: str | None = None
    task: str
    options: dict = Field(default_factory=dict, description="the task's constructor arguments")
    weight: float = Field(1.0, gt=0)


SourceConfig = Annotated[BuiltinSourceConfig | WebDatasetSourceConfig | ZarrSourceConfig | SyntheticSourceConfig,
                         Field(discriminator="type")]


class Ramp(Section):
    start: int = Field(..., ge=2)
    end: int = Field(..., ge=2)
    steps: int = Field(..., ge=1)


class Curriculum(Section):
    stages: list[tuple[int, int]] | None = Field(None, description="[[from_step, seq_len], ...] from step 0")
    ramp: Ramp | None = None

    @model_validator(mode="after")
    def _check(self):
        if (self.stages is None) == (self.ramp is None):
            raise ValueError("give exactly one of stages or ramp")
        if self.stages is not None:
            starts = [s for s, _ in self.stages]
            if not self.stages or starts[0] != 0 or starts != sorted(set(starts)):
                raise ValueError(f"stages must start at step 0 with increasing steps, got {self.stages}")
        if self.ramp is not None and self.ramp.end < self.ramp.start:
            raise ValueError(f"ramp end {self.ramp.end} is below its start {self.ramp.start}")
        return self


class DataConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=lambda: [BuiltinSourceConfig()], min_length=1)
    tokenizer: str = Field("bytes", description="tokenizer of the built-in source: bytes, dna or a tokenizer.json")
    seq_len: int = Field(256, ge=2, description="sequence length (with a curriculum: sets the tokens per step)")
    packing: Literal["concat", "boundaries"] = Field(
        "concat", description="concat: documents run into each other; boundaries: attention and state reset"
    )
    curriculum: Curriculum | None = None
    val_fraction: float = Field(0.02, gt=0, lt=0.5)
    seed: int = 1234
    log_samples: bool = Field(False, description="write RUN_DIR/samples.jsonl: the global sample ids of each step")
    on_error: Literal["fail", "skip"] = Field("fail", description="bad shards/chunks: stop, or skip and count")
    verify_checksums: bool = True

    @model_validator(mode="after")
    def _check(self):
        names = [s.name or f"{s.type}{i}" for i, s in enumerate(self.sources)]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if self.curriculum is not None and any(s.type == "synthetic" for s in self.sources):
            raise ValueError("synthetic sources have a fixed length; they cannot follow a curriculum")
        return self

    def source_names(self) -> list[str]:
        return [s.name or (s.type if len(self.sources) == 1 else f"{s.type}{i}") for i, s in enumerate(self.sources)]


class SpikeConfig(Section):
    """Bad steps: a step whose loss or gradient norm is NaN or infinite is always a bad step; with ``factor``, so is
    one whose loss exceeds ``factor`` times the median loss of the last ``window`` good steps. A bad step's update is
    skipped (its batch is consumed, the weights, optimizer and schedule stay where they were)."""

    factor: float | None = Field(None, gt=1, description="loss spike threshold over the running median (None: off)")
    window: int = Field(20, ge=3, description="good steps the running median is taken over")
    max_consecutive: int = Field(3, ge=1, description="bad steps in a row before the run rolls back to its last "
                                 "checkpoint and skips their batches")


class FaultInjection(Section):
    """Faults a run injects into itself, to exercise its recovery (tests, drills); empty in real runs."""

    nan_loss_at: list[int] = Field(default_factory=list, description="steps whose loss is made NaN before backward")
    stall_at: list[int] = Field(default_factory=list, description="steps during which rank 0 stalls (a hang)")
    stall_seconds: float = Field(0.0, ge=0, description="how long a stall lasts")


class TrainConfig(Section):
    steps: int = Field(..., ge=1, description="optimizer steps of the whole run (the schedule's length)")
    micro_batch_size: int = Field(8, ge=1, description="sequences per rank per forward/backward")
    global_batch_size: int = Field(8, ge=1, description="sequences per optimizer step, all ranks")
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="the training loss's target is (1 - e) one-hot + e "
                                   "uniform over the vocabulary (torch's definition); validation loss stays unsmoothed")
    precision: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False
    seed: int = 1234
    eval_every: int = Field(50, ge=0, description="0 disables periodic validation")
    eval_batches: int = Field(4, ge=1, description="validation: global batches of sequences (one set, any layout)")
    log_every: int = Field(1, ge=1)
    stop_after: int | None = Field(
        None, ge=1, description="end this invocation after this step (as a preemption would); rerun resumes"
    )
    spike: SpikeConfig = SpikeConfig()
    skip_steps: list[int] = Field(default_factory=list, description="steps whose batch is read and discarded, "
                                  "without an update (a known bad batch)")
    fault_injection: FaultInjection = FaultInjection()

    @model_validator(mode="after")
    def _check(self):
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} exceeds lr={self.lr}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}; lower warmup_steps")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of "
                f"micro_batch_size={self.micro_batch_size}"
            )
        return self


class ParallelConfig(Section):
    """The layout: world size = tensor x context x data x pipeline (ranks ordered so, tensor fastest; see
    chimera.parallel.topology), with expert parallelism carved from data x context."""

    tensor: int = Field(1, ge=1, description="tensor-parallel size")
    pipeline: int = Field(1, ge=1, description="pipeline stages (stage boundaries: '|' in model.pattern, else "
                          "balanced by cost)")
    context: int = Field(1, ge=1, description="context-parallel size: ranks each sequence is split over")
    expert: int = Field(1, ge=1, description="expert-parallel size: ranks the experts of each MoE sublayer are "
                        "spread over (divides data x context)")
    data: int | None = Field(None, ge=1, description="data-parallel size; default: world size / (tensor x "
                             "context x pipeline)")
    sequence_parallel: bool = False
    zero_stage: int = Field(0, ge=0, le=3)
    timeout: float = Field(600.0, gt=0, description="seconds a collective may wait for the other ranks before the "
                           "run gives up (a dead or hung rank); the step watchdog dumps every rank's stack after it")
    zero_bucket_size: int = Field(50_000_000, ge=1, description="elements per ZeRO communication bucket (gradient "
                                  "reduction, parameter gathers) and per ZeRO-3 optimizer sub-group; bounds the "
                                  "temporary buffers a step allocates")


class CheckpointConfig(Section):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    every: int = Field(100, ge=0, description="save every N steps (0: only at the end)")
    keep: int = Field(2, ge=1, description="checkpoints kept on disk")
    asynchronous: bool = Field(False, alias="async", description="write checkpoints in the background while "
                               "training continues (a snapshot in host memory is written)")


class LoggingConfig(Section):
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "chimera"
    progress: bool = True
    rank_stats_every: int = Field(50, ge=0, description="every N steps: per-rank step time (min/median/max, the "
                                  "slowest rank) and peak memory in the metrics (0: never)")


SIGNALS = ("USR1", "USR2", "TERM", "INT", "HUP", "QUIT", "XCPU")


class LaunchConfig(Section):
    """How a run is started and kept alive: the cluster launcher's fields (``chimera launch slurm`` takes the same
    as flags), the preemption signals and the restarts after a failure."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (one task each); 0: CPU ranks")
    tasks_per_node: int | None = Field(None, ge=1, description="ranks per node; default: gpus_per_node, or 1")
    cpus_per_task: int | None = Field(None, ge=1)
    partition: str | None = None
    time: str = Field("01:00:00", description="the job's time limit, [D-]HH:MM:SS")
    account: str | None = None
    qos: str | None = None
    exclusive: bool = False
    constraint: str | None = None
    mem: str | None = Field(None, description="memory per node, e.g. 64G")
    setup: list[str] = Field(default_factory=list, description="shell lines run before the ranks start")
    save_before_end: str = Field("5m", description="save and requeue this long before the time limit (s, m, h)")
    stop_signals: list[str] = Field(default_factory=lambda: ["USR2", "TERM"], description="signals that make every "
                                    "rank save at the next step and stop (NCCL takes USR1: nccl#704)")
    max_restarts: int = Field(3, ge=0, description="restarts from the last valid checkpoint after a failure")

    @model_validator(mode="after")
    def _check(self):
        parse_duration(self.time, "launch.time")
        parse_duration(self.save_before_end, "launch.save_before_end")
        bad = [s for s in self.stop_signals if s.upper().removeprefix("SIG") not in SIGNALS]
        if bad:
            raise ValueError(f"unknown signal(s) {bad}; use names from {list(SIGNALS)}")
        return self

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1


def parse_duration(text: str, field: str = "duration") -> float:
    """Seconds of ``90``, ``90s``, ``5m``, ``2h``, ``HH:MM:SS``, ``MM:SS`` or ``D-HH:MM:SS``."""
    value = str(text).strip()
    try:
        if ":" in value or "-" in value:
            days, _, clock = value.rpartition("-")
            parts = [float(p) for p in clock.split(":")]
            seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
            return seconds + 86400 * (float(days) if days else 0.0)
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(value[-1:].lower())
        return float(value[:-1]) * unit if unit else float(value)
    except ValueError:
        raise ValueError(f"{field}={text!r} is not a duration; write e.g. 90s, 5m, 2h or 01:30:00") from None


class RunConfig(Section):
    model: ModelConfig
    data: DataConfig = DataConfig()
    train: TrainConfig
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    launch: LaunchConfig = LaunchConfig()


def accumulation_steps(train: TrainConfig, data_parallel: int) -> int:
    """Micro-batches per optimizer step on each rank: the one place gradient accumulation is computed."""
    per_step = train.micro_batch_size * data_parallel
    if train.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of micro_batch_size x "
            f"data-parallel size = {train.micro_batch_size} x {data_parallel} = {per_step}"
        )
    return train.global_batch_size // per_step


def validate_layout(cfg: RunConfig, world_size: int) -> int:
    """Check that `world_size` ranks can run `cfg`; return the data-parallel size."""
    par, model = cfg.parallel, cfg.model
    model_parallel = par.tensor * par.context * par.pipeline
    factors = (f"tensor x context x pipeline x data = {par.tensor} x {par.context} x {par.pipeline} x data "
               f"(parallel.tensor, parallel.context, parallel.pipeline)")
    if world_size % model_parallel:
        raise UserError(f"world size {world_size} does not factor into {factors}; use --nproc a multiple of "
                        f"{model_parallel}")
    dp = world_size // model_parallel
    if par.data is not None and par.data != dp:
        raise UserError(
            f"parallel.data={par.data} but {world_size} processes factor into {factors} with data = {dp}; "
            f"set --nproc {par.data * model_parallel} or parallel.data={dp}"
        )
    problem = model.check_tensor_parallel(par.tensor)  # each sublayer kind's own rule
    if problem:
        raise UserError(problem)
    _check_byte_latent(cfg)
    _check_pipeline(cfg)
    _check_whole_sequences(cfg)
    _check_experts(cfg, dp)
    t = cfg.train
    tokens_per_micro = t.micro_batch_size * cfg.data.seq_len
    from chimera.data.curriculum import SeqLenSchedule

    for length in SeqLenSchedule(tokens_per_micro, cfg.data.seq_len, cfg.data.curriculum).lengths():
        if tokens_per_micro % length:
            raise UserError(
                f"data.curriculum length {length} does not divide the tokens per micro-batch "
                f"(train.micro_batch_size x data.seq_len = {tokens_per_micro}); choose lengths that divide it"
            )
        _check_sequence_split(par, length)
    accumulation_steps(t, dp)
    return dp


def _check_byte_latent(cfg: RunConfig) -> None:
    """A byte-latent model runs under tensor and data parallelism only (its patches are cut over whole sequences)."""
    par = cfg.parallel
    if cfg.model.byte_latent is None:
        return
    for value, field in ((par.pipeline, "parallel.pipeline"), (par.context, "parallel.context")):
        if value > 1:
            raise UserError(f"{field}={value}: a byte-latent model (model.byte_latent) runs under tensor and data "
                            f"parallelism only; set {field}=1")
    if par.sequence_parallel and par.tensor > 1:
        raise UserError("parallel.sequence_parallel with a byte-latent model (model.byte_latent): its patches are cut "
                        "over whole sequences; set parallel.sequence_parallel=false")


def _check_pipeline(cfg: RunConfig) -> None:
    par, model = cfg.parallel, cfg.model
    stages = model.stage_patterns
    if stages is not None and len(stages) != par.pipeline:
        raise UserError(f"model.pattern {model.pattern!r} marks {len(stages)} pipeline stages with '|' but "
                        f"parallel.pipeline={par.pipeline}; set parallel.pipeline={len(stages)} or change the '|'s")
    units = len(model.layer_units())
    if par.pipeline > units:
        raise UserError(f"parallel.pipeline={par.pipeline} stages but the model has only {units} layers: a stage "
                        f"would have no layers; use at most {units} stages")
    if par.pipeline > 1:
        from chimera.models import registry

        refused = [s for s in model.kinds() if not registry.sublayers()[s].pipeline_parallel]
        if refused:
            raise UserError(f"parallel.pipeline={par.pipeline}: sublayer {refused[0]!r} "
                            f"({registry.sublayers()[refused[0]].summary}) reads what earlier sublayers publish in "
                            "the pass, which pipeline stages do not carry; set parallel.pipeline=1")
        if model.numerics.embedding_norm:
            raise UserError(f"parallel.pipeline={par.pipeline} with model.embedding_norm: the pipeline's first stage "
                            "does not hold the embedding norm; set parallel.pipeline=1")
    if par.pipeline > 1 and par.zero_stage > 1:
        raise UserError(f"parallel.zero_stage={par.zero_stage} with parallel.pipeline={par.pipeline}: DeepSpeed's "
                        "pipeline engine runs ZeRO stage 0 or 1 only; set parallel.zero_stage=1")


def _check_whole_sequences(cfg: RunConfig) -> None:
    """Kinds that reorder a sequence's tokens (``SublayerSpec.whole_sequence``) need each sequence on one rank."""
    par = cfg.parallel
    split = par.context > 1 or (par.sequence_parallel and par.tensor > 1)
    if split:
        from chimera.models import registry

        refused = [s for s in cfg.model.kinds() if registry.sublayers()[s].whole_sequence]
        if refused:
            raise UserError(f"sublayer {refused[0]!r} ({registry.sublayers()[refused[0]].summary}) needs each whole "
                            f"sequence on one rank; set parallel.context=1 and parallel.sequence_parallel=false")


def _check_experts(cfg: RunConfig, dp: int) -> None:
    par = cfg.parallel
    if par.expert == 1:
        return
    problem = cfg.model.check_expert_parallel(par.expert)
    if problem:
        raise UserError(problem)
    if (dp * par.context) % par.expert:
        raise UserError(f"parallel.expert={par.expert} must divide data x context = {dp} x {par.context} (experts "
                        "are spread over data-parallel ranks); change parallel.expert or the number of processes")
    if par.zero_stage == 3:
        raise UserError(f"parallel.expert={par.expert} with parallel.zero_stage=3: DeepSpeed's ZeRO-3 does not "
                        "partition expert-parallel parameters; use parallel.zero_stage 0, 1 or 2")


def _check_sequence_split(par: ParallelConfig, length: int) -> None:
    """Each context-parallel rank holds ``length / context`` positions; sequence parallelism splits those over
    the tensor-parallel ranks."""
    split = par.context * (par.tensor if par.sequence_parallel else 1)
    if length % split:
        what = (f"parallel.context x parallel.tensor = {par.context} x {par.tensor} (sequence parallelism)"
                if par.sequence_parallel and par.tensor > 1 else f"parallel.context={par.context}")
        raise UserError(f"{what} does not divide the sequence length {length} (data.seq_len or a curriculum "
                        f"length); choose a sequence length divisible by {split}")
