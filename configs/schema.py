"""The typed run configuration: one YAML file describes a run.

Every section forbids unknown keys, so a typo is an error that names the field path. Checks that
need more than one field (a TP size that divides the heads, a batch that divides over ranks) live
in ``validate_layout``, which runs before any process starts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from chimera.errors import UserError

# One symbol per residual sublayer, Megatron-Core's hybrid layer pattern being the anchor.
LAYER_SYMBOLS = {
    "R": "RG-LRU recurrent block (Griffin)",
    "L": "local sliding-window attention",
    "*": "global causal attention",
    "-": "gated MLP",
}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """Architecture. A preset (configs/presets/NAME.yaml) fills these; the run file may override any."""

    preset: str | None = Field(None, description="preset this model was built from")
    name: str = "custom"
    pattern: str = Field(..., min_length=1, description="layer pattern, one symbol per sublayer")
    num_layers: int | None = Field(None, ge=1, description="repeat `pattern` cyclically to this many sublayers")
    vocab_size: int = Field(..., ge=2)
    d_model: int = Field(..., ge=1)
    num_heads: int = Field(..., ge=1)
    num_kv_heads: int = Field(1, ge=1)
    head_dim: int | None = Field(None, ge=1)
    window: int = Field(1024, ge=1, description="sliding window of local attention (symbol L)")
    rope_base: float = Field(10000.0, gt=0)
    rope_fraction: float = Field(1.0, gt=0, le=1.0, description="fraction of head dims rotated by RoPE")
    mlp_hidden: int = Field(..., ge=1, description="width of each branch of the gated MLP")
    rnn_width: int | None = Field(None, ge=1, description="RG-LRU width (defaults to d_model)")
    rnn_heads: int | None = Field(None, ge=1, description="blocks of the block-diagonal RG-LRU gates")
    conv_kernel: int = Field(4, ge=1)
    norm_eps: float = Field(1e-6, gt=0)
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _check(self):
        bad = sorted(set(self.pattern) - set(LAYER_SYMBOLS) - {"|"})
        if bad:
            allowed = ", ".join(f"'{k}' ({v})" for k, v in LAYER_SYMBOLS.items())
            raise ValueError(f"unknown layer symbol(s) {bad} in pattern {self.pattern!r}; allowed: {allowed}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model} (or set head_dim)")
        if self.rnn_width is not None and self.rnn_heads is not None and self.rnn_width % self.rnn_heads:
            raise ValueError(f"rnn_heads={self.rnn_heads} must divide rnn_width={self.rnn_width}")
        return self

    @property
    def layers(self) -> str:
        """The expanded layer pattern: one symbol per sublayer, stage boundaries removed."""
        unit = self.pattern.replace("|", "")
        if self.num_layers is None:
            return unit
        return "".join(unit[i % len(unit)] for i in range(self.num_layers))

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def lru_width(self) -> int:
        return self.rnn_width or self.d_model

    @property
    def lru_heads(self) -> int:
        return self.rnn_heads or self.num_heads


class DataConfig(Section):
    source: Literal["stdlib"] = Field("stdlib", description="built-in corpus: the interpreter's stdlib sources")
    tokenizer: Literal["bytes"] = "bytes"
    seq_len: int = Field(256, ge=2)
    val_fraction: float = Field(0.02, gt=0, lt=0.5)
    include_tests: bool = Field(False, description="include the stdlib's test/ folders")
    seed: int = 1234


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
    precision: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False
    seed: int = 1234
    eval_every: int = Field(50, ge=0, description="0 disables periodic validation")
    eval_batches: int = Field(4, ge=1)
    log_every: int = Field(1, ge=1)
    stop_after: int | None = Field(
        None, ge=1, description="end this invocation after this step (as a preemption would); rerun resumes"
    )

    @model_validator(mode="after")
    def _check(self):
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} exceeds lr={self.lr}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of "
                f"micro_batch_size={self.micro_batch_size}"
            )
        return self


class ParallelConfig(Section):
    tensor: int = Field(1, ge=1, description="tensor-parallel size")
    pipeline: int = Field(1, ge=1, le=1, description="pipeline-parallel size (pipelines arrive in a later issue)")
    data: int | None = Field(None, ge=1, description="data-parallel size; default: world size / (tensor x pipeline)")
    sequence_parallel: bool = False
    zero_stage: int = Field(0, ge=0, le=3)


class CheckpointConfig(Section):
    every: int = Field(100, ge=0, description="save every N steps (0: only at the end)")
    keep: int = Field(2, ge=1, description="checkpoints kept on disk")


class LoggingConfig(Section):
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "chimera"
    progress: bool = True


class RunConfig(Section):
    model: ModelConfig
    data: DataConfig = DataConfig()
    train: TrainConfig
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()


def validate_layout(cfg: RunConfig, world_size: int) -> int:
    """Check that `world_size` ranks can run `cfg`; return the data-parallel size."""
    par, m = cfg.parallel, cfg.model
    model_parallel = par.tensor * par.pipeline
    if world_size % model_parallel:
        raise UserError(
            f"world size {world_size} does not factor into tensor x pipeline x data "
            f"(parallel.tensor={par.tensor} x parallel.pipeline={par.pipeline} = {model_parallel}); "
            f"use --nproc a multiple of {model_parallel}"
        )
    dp = world_size // model_parallel
    if par.data is not None and par.data != dp:
        raise UserError(
            f"parallel.data={par.data} but {world_size} processes / (tensor x pipeline = {model_parallel}) "
            f"gives {dp}; set --nproc {par.data * model_parallel} or parallel.data={dp}"
        )
    tp = par.tensor
    for field, value in (
        ("model.num_heads", m.num_heads),
        ("model.mlp_hidden", m.mlp_hidden),
        ("model.vocab_size", m.vocab_size),
    ):
        if value % tp:
            raise UserError(f"parallel.tensor={tp} does not divide {field}={value}; choose a divisor of {value}")
    if "R" in m.layers:
        for field, value in (("model.rnn_heads", m.lru_heads), ("model.rnn_width", m.lru_width)):
            if value % tp:
                raise UserError(f"parallel.tensor={tp} does not divide {field}={value}; choose a divisor of {value}")
    if m.num_kv_heads % tp and tp % m.num_kv_heads:
        raise UserError(
            f"parallel.tensor={tp} and model.num_kv_heads={m.num_kv_heads}: one must divide the other"
        )
    t = cfg.train
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size x data-parallel "
            f"size = {t.micro_batch_size} x {dp} = {per_step}"
        )
    return dp
