"""The typed run configuration: one YAML file describes a run.

Every section forbids unknown keys, so a typo is an error that names the field path. Checks that
need more than one field (a TP size that divides the heads, a batch that divides over ranks) live
in ``validate_layout``, which runs before any process starts.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from chimera.errors import UserError

# One symbol per residual sublayer, Megatron-Core's hybrid layer pattern being the anchor.
LAYER_SYMBOLS = {
    "R": "RG-LRU recurrent block (Griffin)",
    "L": "local sliding-window attention",
    "*": "global causal attention",
    "-": "gated MLP",
    "m": "Mamba selective SSM (Mamba-1)",
    "M": "Mamba-2 SSD",
    "E": "mixture of experts (gated-MLP experts, top-k router; with moe_shared_hidden also an always-on shared "
         "expert whose output is added to the routed experts', as in Granite-4.0-H / Qwen-MoE / DeepSeek-MoE)",
    "0": "shared block 0 (model.shared_blocks[0]: one set of parameters at every use)",
    "1": "shared block 1 (model.shared_blocks[1])",
}
# With shared_block_style "zamba" a shared symbol is not a sublayer of its own: its output feeds the next one.
SHARED_SYMBOLS = "01"
ZAMBA_SHARED_BLOCK = "*-"  # the only block a Zamba-style use runs: attention, then the MLP
# The sublayer kinds that read a field (a field not listed here is read by every model).
FIELD_SYMBOLS = {
    "window": "L", "rope_base": "L*", "rope_fraction": "L*", "num_heads": "L*", "num_kv_heads": "L*",
    "head_dim": "L*", "attention_scale": "L*", "attention_bias": "L*", "mlp_hidden": "-", "mlp_activation": "-E",
    "rnn_width": "R", "rnn_heads": "R", "rglru_reset_unnormalized": "R", "conv_kernel": "RmM",
    "ssm_state": "mM", "ssm_expand": "mM", "ssm_dt_rank": "m", "ssm_dt_bc_norm": "m", "ssm_heads": "m",
    "ssm_head_dim": "M", "ssm_groups": "M", "ssm_dt_min": "M", "ssm_norm_eps": "M",
    "moe_experts": "E", "moe_top_k": "E", "moe_hidden": "E", "moe_normalize_top_k": "E", "moe_capacity_factor": "E",
    "moe_shared_hidden": "E", "shared_block_style": "01", "shared_lora_rank": "01", "shared_lora_attention": "01",
}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """Architecture. A preset (configs/presets/NAME.yaml) fills these; the run file may override any."""

    preset: str | None = Field(None, description="preset this model was built from")
    name: str = "custom"
    family: str | None = Field(None, description="the HF architecture this model corresponds to (for export)")
    pattern: str = Field(..., min_length=1, description="layer pattern, one symbol per sublayer")
    num_layers: int | None = Field(None, ge=1, description="repeat `pattern` cyclically to this many sublayers")
    vocab_size: int = Field(..., ge=2)
    d_model: int = Field(..., ge=1)
    num_heads: int = Field(1, ge=1)
    num_kv_heads: int = Field(1, ge=1)
    head_dim: int | None = Field(None, ge=1)
    window: int = Field(1024, ge=1, description="sliding window of local attention (symbol L)")
    rope_base: float = Field(10000.0, gt=0)
    rope_fraction: float = Field(1.0, ge=0, le=1.0, description="fraction of head dims rotated by RoPE (0: no RoPE)")
    mlp_hidden: int | None = Field(None, ge=1, description="width of each branch of the gated MLP")
    rnn_width: int | None = Field(None, ge=1, description="RG-LRU width (defaults to d_model)")
    rnn_heads: int | None = Field(None, ge=1, description="blocks of the block-diagonal RG-LRU gates")
    conv_kernel: int = Field(4, ge=1)
    moe_experts: int = Field(8, ge=1)
    moe_top_k: int = Field(2, ge=1)
    moe_hidden: int | None = Field(None, ge=1, description="width of each expert (default mlp_hidden)")
    moe_normalize_top_k: bool = Field(False, description="renormalise the top-k router weights to sum to 1")
    moe_capacity_factor: float | None = Field(None, gt=0, description="None: dropless")
    moe_aux_loss_coef: float = Field(0.01, ge=0, description="load-balancing loss weight")
    moe_z_loss_coef: float = Field(0.0, ge=0, description="router z-loss weight")
    moe_shared_hidden: int | None = Field(
        None, ge=1, description="width of a shared expert (gated MLP) in every 'E' sublayer, run on every token and "
        "added to the routed output (Granite's shared_mlp, Megatron's moe_shared_expert_intermediate_size); None: none"
    )
    shared_blocks: list[str] = Field(
        default_factory=list, description="patterns of shared blocks; symbol '0', '1' in `pattern` applies one"
    )
    shared_block_style: Literal["residual", "zamba"] = Field(
        "residual", description="residual: a shared block's sublayers are ordinary pre-norm residual sublayers. "
        "zamba (Zamba, Zamba2): the block ('*-') reads concat(h, token embeddings), has no residual of its own, "
        "and its output, through a per-use linear, is added to the input (not the residual) of the next sublayer"
    )
    shared_lora_rank: int | None = Field(
        None, ge=1, description="zamba style: rank of per-use LoRA adapters on the shared MLP's gate/up (Zamba2)"
    )
    shared_lora_attention: bool = Field(False, description="zamba style: per-use LoRA on the shared q, k, v too")
    mlp_activation: Literal["gelu_tanh", "gelu", "silu"] = Field("gelu_tanh", description="gate of the gated MLP")
    ssm_state: int = Field(16, ge=1, description="Mamba: state size N per channel (Mamba-2: per head)")
    ssm_expand: int = Field(2, ge=1, description="Mamba: inner width = ssm_expand x d_model")
    ssm_dt_rank: int | None = Field(None, ge=1, description="Mamba-1: rank of the dt projection (default d/16)")
    ssm_heads: int = Field(
        1, ge=1, description="Mamba-1: independent heads over d_inner / ssm_heads channels each, with their own "
        "x_proj and dt_proj (Zamba's n_mamba_heads)"
    )
    ssm_dt_bc_norm: bool = Field(
        False, description="Mamba-1: RMSNorm (eps norm_eps) on dt, B and C after x_proj, as in Jamba"
    )
    ssm_head_dim: int = Field(64, ge=1, description="Mamba-2: head dimension")
    ssm_groups: int = Field(1, ge=1, description="Mamba-2: groups sharing B and C")
    ssm_chunk: int = Field(64, ge=1, description="Mamba-2: chunk length of the SSD reference")
    ssm_dt_min: float = Field(0.0, ge=0, description="Mamba-2: dt is clamped to at least this (Zamba2: 1e-3)")
    ssm_norm_eps: float | None = Field(None, gt=0, description="Mamba-2: eps of the gated RMSNorm (default norm_eps)")
    norm_eps: float = Field(1e-6, gt=0)
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)
    # Numerics of particular released models (RecurrentGemma sets all of these):
    scale_embeddings: bool = Field(False, description="multiply embeddings by sqrt(d_model), rounded to bf16")
    norm_offset: bool = Field(False, description="RMSNorm scales by (1 + w), w initialised to 0")
    logits_soft_cap: float | None = Field(None, gt=0, description="logits -> cap * tanh(logits / cap)")
    linear_bias: bool = Field(False, description="biases on recurrent-block, attention-output and MLP projections")
    rglru_reset_unnormalized: bool = Field(
        False, description="RG-LRU: at a document's first token the input is not scaled by sqrt(1 - a^2)"
    )
    # muP-style multipliers (Granite sets all of these; the defaults leave a model unchanged):
    embedding_multiplier: float = Field(1.0, gt=0, description="embeddings are multiplied by this")
    residual_multiplier: float = Field(
        1.0, gt=0, description="each sublayer's output is multiplied by this before the residual add"
    )
    attention_scale: float | None = Field(
        None, gt=0, description="softmax scale of attention scores (None: 1 / sqrt(head_dim))"
    )
    logits_divisor: float = Field(1.0, gt=0, description="logits are divided by this (Granite's logits_scaling)")
    attention_bias: bool = Field(False, description="biases on the q, k, v and o projections of attention")

    @model_validator(mode="after")
    def _check(self):
        if "-" in self.pattern and self.mlp_hidden is None:
            raise ValueError("the pattern has MLP sublayers ('-'): set mlp_hidden")
        if "E" in self.pattern and (self.moe_hidden or self.mlp_hidden) is None:
            raise ValueError("the pattern has MoE sublayers ('E'): set moe_hidden or mlp_hidden")
        if self.moe_top_k > self.moe_experts:
            raise ValueError(f"moe_top_k={self.moe_top_k} exceeds moe_experts={self.moe_experts}")
        for i, block in enumerate(self.shared_blocks):
            if set(block) - set(LAYER_SYMBOLS) or set(block) & {"0", "1"}:
                raise ValueError(f"shared_blocks[{i}] = {block!r}: use the layer symbols, without shared ones")
        if self.shared_block_style == "zamba":
            self._check_zamba_style()
        elif self.shared_lora_rank or self.shared_lora_attention:
            raise ValueError("shared_lora_rank / shared_lora_attention need shared_block_style: zamba")
        used = {int(c) for c in self.pattern if c in "01"}
        if used and max(used) >= len(self.shared_blocks):
            raise ValueError(f"pattern uses shared block {max(used)} but shared_blocks has {len(self.shared_blocks)}")
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

    def _check_zamba_style(self) -> None:
        if any(block != ZAMBA_SHARED_BLOCK for block in self.shared_blocks):
            raise ValueError(f"shared_block_style zamba runs an attention+MLP block: every entry of shared_blocks must "
                             f"be {ZAMBA_SHARED_BLOCK!r}, not {self.shared_blocks}")
        layers = self.layers
        for i, symbol in enumerate(layers):
            if symbol in SHARED_SYMBOLS and (i + 1 == len(layers) or layers[i + 1] in SHARED_SYMBOLS):
                raise ValueError(f"shared_block_style zamba: shared symbol {symbol!r} at position {i} of "
                                 f"{layers!r} must be followed by the sublayer it feeds (e.g. '0m')")
        if self.mlp_hidden is None:
            raise ValueError("shared_block_style zamba: set mlp_hidden (the shared block's MLP)")
        if self.shared_lora_attention and not self.shared_lora_rank:
            raise ValueError("shared_lora_attention needs shared_lora_rank")

    @property
    def layers(self) -> str:
        """The expanded layer pattern: one symbol per sublayer, stage boundaries removed."""
        unit = self.pattern.replace("|", "")
        if self.num_layers is None:
            return unit
        return "".join(unit[i % len(unit)] for i in range(self.num_layers))

    @property
    def symbols(self) -> set[str]:
        """The sublayer kinds of this model, its shared blocks' included."""
        return set(self.layers) | set("".join(self.shared_blocks))

    def uses(self, field: str) -> bool:
        """Whether any sublayer of this model reads ``field``."""
        return field not in FIELD_SYMBOLS or bool(set(FIELD_SYMBOLS[field]) & self.symbols)

    def effective(self, field: str):
        """``field``'s value as the model uses it: defaults that derive from other fields resolved."""
        derived = {"head_dim": self.head_size, "rnn_width": self.lru_width, "rnn_heads": self.lru_heads,
                   "moe_hidden": self.moe_hidden or self.mlp_hidden,
                   "ssm_dt_rank": self.ssm_dt_rank or -(-self.d_model // 16),
                   "ssm_norm_eps": self.ssm_norm_eps or self.norm_eps}
        return derived.get(field, getattr(self, field))

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def lru_width(self) -> int:
        return self.rnn_width or self.d_model

    @property
    def lru_heads(self) -> int:
        return self.rnn_heads or self.num_heads


class BuiltinSource(Section):
    """The interpreter's standard-library sources (present on every machine)."""

    type: Literal["builtin"] = "builtin"
    name: str = "builtin"
    weight: float = Field(1.0, gt=0)
    include_tests: bool = Field(False, description="include the stdlib's test/ folders")


class WebDatasetSource(Section):
    """Tar shards written by `chimera data prepare --format webdataset`."""

    type: Literal["webdataset"]
    name: str | None = None
    path: str = Field(..., description="the prepared dataset directory (or its manifest.json)")
    urls: str | None = Field(None, description="brace pattern of shard URLs (e.g. pipe:...) in manifest order")
    weight: float = Field(1.0, gt=0)


class ZarrSource(Section):
    """A token store written by `chimera data prepare --format zarr`."""

    type: Literal["zarr"]
    name: str | None = None
    path: str
    weight: float = Field(1.0, gt=0)


class SyntheticSource(Section):
    """A generated task (chimera.data.synthetic): MQAR or a Chomsky-hierarchy task."""

    type: Literal["synthetic"]
    name: str | None = None
    task: str
    options: dict = Field(default_factory=dict, description="the task's constructor arguments")
    weight: float = Field(1.0, gt=0)


Source = Annotated[BuiltinSource | WebDatasetSource | ZarrSource | SyntheticSource, Field(discriminator="type")]


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
    sources: list[Source] = Field(default_factory=lambda: [BuiltinSource()], min_length=1)
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
    attention = bool(set("L*") & m.symbols)
    for field, value in (
        ("model.num_heads", m.num_heads if attention else tp),
        ("model.mlp_hidden", m.mlp_hidden or tp),
        ("model.moe_hidden", (m.moe_hidden or m.mlp_hidden or tp) if "E" in m.layers else tp),
        ("model.moe_shared_hidden", (m.moe_shared_hidden or tp) if "E" in m.layers else tp),
        ("model.vocab_size", m.vocab_size),
    ):
        if value % tp:
            raise UserError(f"parallel.tensor={tp} does not divide {field}={value}; choose a divisor of {value}")
    if "R" in m.layers:
        for field, value in (("model.rnn_heads", m.lru_heads), ("model.rnn_width", m.lru_width)):
            if value % tp:
                raise UserError(f"parallel.tensor={tp} does not divide {field}={value}; choose a divisor of {value}")
    if set("mM") & set(m.layers) and (m.ssm_expand * m.d_model) % tp:
        raise UserError(f"parallel.tensor={tp} does not divide the Mamba inner width "
                        f"model.ssm_expand x model.d_model = {m.ssm_expand * m.d_model}")
    if "m" in m.layers and m.ssm_heads > 1 and m.ssm_heads % tp:
        raise UserError(f"parallel.tensor={tp} does not divide model.ssm_heads={m.ssm_heads} (Mamba heads stay whole)")
    if m.shared_lora_attention and m.num_kv_heads % tp:
        raise UserError(f"parallel.tensor={tp} does not divide model.num_kv_heads={m.num_kv_heads}, which LoRA on "
                        f"the shared k/v needs")
    if "M" in m.layers and (m.ssm_expand * m.d_model // m.ssm_head_dim) % tp:
        raise UserError(f"parallel.tensor={tp} does not divide the Mamba-2 heads "
                        f"(ssm_expand x d_model / ssm_head_dim = {m.ssm_expand * m.d_model // m.ssm_head_dim})")
    if attention and m.num_kv_heads % tp and tp % m.num_kv_heads:
        raise UserError(
            f"parallel.tensor={tp} and model.num_kv_heads={m.num_kv_heads}: one must divide the other"
        )
    t = cfg.train
    tokens_per_micro = t.micro_batch_size * cfg.data.seq_len
    from chimera.data.curriculum import SeqLenSchedule

    for length in SeqLenSchedule(tokens_per_micro, cfg.data.seq_len, cfg.data.curriculum).lengths():
        if tokens_per_micro % length:
            raise UserError(
                f"data.curriculum length {length} does not divide the tokens per micro-batch "
                f"(train.micro_batch_size x data.seq_len = {tokens_per_micro}); choose lengths that divide it"
            )
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size x data-parallel "
            f"size = {t.micro_batch_size} x {dp} = {per_step}"
        )
    return dp
