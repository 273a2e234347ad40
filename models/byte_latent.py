"""A byte-latent language model in the spirit of BLT (Byte Latent Transformer, Pagnoni et al., arXiv 2412.09871),
with a striped Hyena + attention global model, for genomic sequences (Hyena-GLT).

On bytes ``x_1 .. x_S`` (the byte tokenizer's ids; DNA, RNA and protein are each an alphabet of it)::

    H_t      = entropy of the entropy model's p(x_{t+1} | x_{<=t})          # a tiny causal byte LM (its own loss)
    patches  = segment(H > threshold, documents)                          # chimera.models.patching
    e_t      = E_local[x_t] + T[type]                                      # byte embedding + sequence-type embedding
    h_t      = LocalEncoder(e)_t                                           # causal byte-level sublayers
    p_j      = W_down mean_{t in patch j} h_t                              # one vector per patch (d_global)
    g_j      = GlobalModel(p)_j                                            # the layer pattern over patches, causal
    c_t      = W_up g_{reads_t}        (a learned vector where none)       # the finished patch byte t may read
    y_t      = LocalDecoder(h + c)_t -> logits of x_{t+1}                  # causal byte-level sublayers, byte head

Byte ``t``'s logits depend only on bytes ``<= t``: the entropy model, the local encoder and decoder are causal, and
a byte reads the global output of a patch only once that patch has closed at or before it (``Patches.reads``). The
global model runs with the patches' documents (a document's first byte always begins a patch), so nothing crosses
a packed document boundary.

The parts are Chimera's own stacks: the entropy model is a ``CausalLM`` (``model.byte_latent.entropy_model``, the
global model's fields with its own width and pattern); the local encoder and decoder are one ``CausalLM`` whose first
``encoder_layers`` sublayers encode and the rest decode, its embedding the byte embedding and its head the byte head
(``model.byte_latent.local_model``); the global model is the sublayers of ``model.pattern`` at ``model.d_model``, built
as the causal LM builds its stack. Tensor parallelism splits each of them as it splits a causal LM; the patching,
pooling and the projections between widths are replicated (every rank computes them alike).

The entropy model is trained jointly, by its own next-byte loss (weight ``entropy_loss_weight``) on the same
batches: its logits decide the patches after ``detach``, so the main loss sends it no gradient (the boundaries are
discrete) and it learns only to predict bytes, BLT's entropy model objective. Training it jointly keeps a run
self-contained (no second pretraining run to track); the price is that patches are fine early on (an untrained byte
LM is uncertain everywhere: nearly one patch per byte) and grow as it learns, which the patch metrics show.
For a fixed entropy model (a checkpoint) the boundaries are a deterministic function of the bytes. The validation
loss is the byte LM's alone.

Decoding (``init_state`` + ``step``) runs each part's own decoding step: per byte, the entropy model's step (does
a patch close here?), the encoder's step, a running sum of the patch's encoder outputs, the global model's step
once per closed patch (at the patch's position), the decoder's step. Rows close patches at different bytes, so each
row decodes with its own state.

Layouts: tensor and data parallelism (any ZeRO stage); pipeline and context parallelism and sequence parallelism
are refused (``chimera.configs.schema.validate_layout``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from chimera.models.causal_lm import CausalLM, build_layers, reported_metrics, summed_auxiliary_loss
from chimera.models.config import ModelConfig
from chimera.models.documents import PackedDocuments
from chimera.models.norms import build_norm
from chimera.models.patching import SEQUENCE_TYPES, Patches, closes_patch, next_byte_entropy, pool, read_back, segment
from chimera.models.spec import Build
from chimera.models.sublayer import Context
from chimera.parallel.dims import SINGLE_PROCESS, ParallelDims
from chimera.parallel.layers import gather_vocab
from chimera.parallel.sharding import declare, full_shape, normal


def _parameter(*shape: int, std: float) -> nn.Parameter:
    return declare(nn.Parameter(torch.empty(*shape)), init=normal(std))


class Bridge(nn.Module):
    """What joins the byte level and the patch level: the type embedding, the projections between the widths, the
    vector a byte reads before its document's first patch has closed; and the patch statistics of the last pass
    (mean patch length in bytes, patches per sequence, compression ratio = bytes / the global model's length, the mean
    next-byte entropy in nats, the number to set ``entropy_threshold`` against)."""

    metrics_group = "byte_latent"

    def __init__(self, d_local: int, d_global: int, std: float):
        super().__init__()
        self.type_embedding = _parameter(len(SEQUENCE_TYPES), d_local, std=std)  # T: [types, d_local]
        self.down = _parameter(d_global, d_local, std=std)  # W_down
        self.up = _parameter(d_local, d_global, std=std)  # W_up
        self.none = _parameter(d_global, std=std)
        self.stats: dict = {}

    def record(self, patches: Patches, bytes_: int) -> None:
        count = int(patches.count.sum())
        self.stats |= {"mean_patch_length": bytes_ / count, "patches": count / patches.count.numel(),
                      "compression_ratio": patches.starts.shape[1] / patches.length}

    def metrics(self) -> dict:
        return dict(self.stats)


class GlobalModel(nn.Module):
    """The layer pattern's sublayers over patch vectors ``[P, b, d]``, then a final norm.

    With ``byte_latent.token_merging``, after the first ``merge_after`` sublayers similar neighbouring patches are
    merged (``chimera.models.token_merging``: causal neighbour pairs within documents), the remaining sublayers run on
    the merged sequence, and what they add is un-merged onto the patch stream: ``g = x + unmerge(y - z)`` (``x`` the
    patch stream at the merge, ``z`` the merged tokens, ``y`` their output), so that a patch whose un-merge reads
    nothing (or the group before it) keeps its own vector. Decoding follows the merge patch by patch: a patch that
    may still merge with the next waits (and reads the group before it, as un-merging does), a pair that merges goes
    through the later sublayers as its mean, at the merged sequence's position."""

    def __init__(self, cfg: ModelConfig, dims: ParallelDims):
        super().__init__()
        build = Build.of(cfg, dims)
        self.shared = nn.ModuleList(cfg.style.build_block(cfg, i, build) for i in range(len(cfg.shared_blocks)))
        self.layers = nn.ModuleList(build_layers(cfg, build, self.shared))
        self.final_norm = build_norm(cfg.numerics, cfg.d_model, cfg.norm_eps, kernels=cfg.kernels)
        self.activation_checkpointing = False
        bl = cfg.byte_latent
        self.merge, self.merge_after = None, len(self.layers)
        if bl.token_merging:
            from chimera.models.token_merging import NeighbourMerge

            self.merge_after = len(self.layers) // 2 if bl.merge_after is None else bl.merge_after
            with torch.device("cpu"):  # its threshold buffer is built here, not drawn (the model is built on meta)
                self.merge = NeighbourMerge(bl.merge_threshold, max_ratio=bl.merge_max_ratio,
                                            learned=bl.merge_learned)
            self.merge.metrics_group = "byte_latent"
            if bl.merge_learned:
                declare(self.merge.threshold, init=lambda t, g: t.fill_(bl.merge_threshold), weight_decay=False)

    def _run(self, x: torch.Tensor, docs: PackedDocuments | None, layers) -> torch.Tensor:
        context = Context(embeddings=x, docs=docs)
        for layer in layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, context, use_reentrant=False)
            else:
                x = layer(x, context)
        return x

    def forward(self, p: torch.Tensor, docs: PackedDocuments | None, segment_ids: torch.Tensor) -> torch.Tensor:
        """``p [P, b, d]``, ``segment_ids [b, P]`` the patches' documents (``docs``: None for one per row)."""
        x = self._run(p, docs, self.layers[: self.merge_after])
        if self.merge is None:
            return self.final_norm(x)
        z, merged_segments, merges = self.merge(x.transpose(0, 1), segment_ids)  # [b, m, d]
        merged_docs = None if docs is None else PackedDocuments.from_batch(merged_segments, merges.position_ids)
        y = self._run(z.transpose(0, 1), merged_docs, self.layers[self.merge_after:]).transpose(0, 1)
        return self.final_norm(x + merges.unmerge(y - z).transpose(0, 1))

    # ---- decoding -----------------------------------------------------------------------------

    def init_state(self, batch: int, max_len: int) -> dict:
        return {"layers": [layer.init_state(batch, max_len) for layer in self.layers], "pending": None,
                "merges": 0, "seen": 0, "pushed": 0, "last": None}

    def _step_layers(self, x: torch.Tensor, state: dict, lo: int, hi: int, pos: int) -> torch.Tensor:
        context = Context(embeddings=x, position=pos)
        for layer, layer_state in zip(self.layers[lo:hi], state["layers"][lo:hi]):
            x = layer.step(x, layer_state, context)
        return x

    def _push(self, z: torch.Tensor, state: dict) -> torch.Tensor:
        """A merged token through the later sublayers (at the merged sequence's next position); what they add."""
        y = self._step_layers(z, state, self.merge_after, len(self.layers), state["pushed"])
        state["pushed"] += 1
        state["last"] = y - z
        return state["last"]

    def step(self, p: torch.Tensor, state: dict, pos: int) -> torch.Tensor:
        """Patch ``pos`` (one document) ``[1, 1, d]`` -> its global output ``[1, 1, d]``."""
        x = self._step_layers(p, state, 0, self.merge_after, pos)
        if self.merge is None:
            return self.final_norm(x)
        tau, rho = float(self.merge.threshold), self.merge.max_ratio
        state["seen"] += 1
        pending, state["pending"] = state["pending"], None
        if pos % 2 == 1:  # the second of a pair: merges with a waiting first, or both go on alone
            similar = pending is not None and float(torch.cosine_similarity(x, pending, dim=-1)) > tau
            if similar and state["merges"] + 1 <= math.floor(rho * state["seen"]):
                state["merges"] += 1
                return self.final_norm(x + self._push((pending + x) / 2, state))
            if pending is not None:
                self._push(pending, state)
            return self.final_norm(x + self._push(x, state))
        if tau < 1 and state["merges"] < math.floor(rho * (state["seen"] + 1)):  # may merge with the next: waits
            state["pending"] = x
            return self.final_norm(x if state["last"] is None else x + state["last"])
        return self.final_norm(x + self._push(x, state))


class ByteLatentLM(nn.Module):
    """``forward(input_ids, labels, segment_ids, position_ids)`` as ``CausalLM``'s: logits ``[b, s, V]`` over bytes,
    or the training objective; ``features`` the decoder's hidden vector per input byte."""

    def __init__(self, cfg: ModelConfig, dims: ParallelDims = SINGLE_PROCESS):
        super().__init__()
        self.cfg, self.dims = cfg, dims
        self.settings = cfg.byte_latent
        self.entropy = CausalLM(cfg.entropy_model, dims)
        self.local = CausalLM(cfg.local_model, dims)  # its layers: encoder_layers, then the decoder's
        self.bridge = Bridge(cfg.local_model.d_model, cfg.d_model, cfg.init_std)
        self.global_model = GlobalModel(cfg, dims)
        self.label_smoothing = 0.0

    @property
    def activation_checkpointing(self) -> bool:
        return self.global_model.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        for part in (self.entropy, self.local, self.global_model):
            part.activation_checkpointing = on

    @property
    def encoder(self) -> nn.ModuleList:
        return self.local.layers[: self.settings.encoder_layers]

    @property
    def decoder(self) -> nn.ModuleList:
        return self.local.layers[self.settings.encoder_layers:]

    def _type_ids(self, sequence_type, batch: int, device) -> torch.Tensor:
        """``[b]`` type indices from a name, a tensor of indices, or None (the configured type)."""
        if sequence_type is None or isinstance(sequence_type, str):
            name = sequence_type or self.settings.sequence_type
            if name not in SEQUENCE_TYPES:
                raise ValueError(f"sequence type {name!r}: choose one of {', '.join(SEQUENCE_TYPES)}")
            return torch.full((batch,), SEQUENCE_TYPES.index(name), dtype=torch.long, device=device)
        return sequence_type.to(device=device, dtype=torch.long).expand(batch)

    # ---- one pass ------------------------------------------------------------------------------

    def _entropy_logits(self, input_ids, segment_ids, position_ids) -> torch.Tensor:
        x, context = self.entropy.input_stream(input_ids, segment_ids, position_ids)
        return self.entropy.logits_local(self.entropy.run_layers(x, context))

    def _patches(self, entropy_logits_local, segment_ids, position_ids) -> Patches:
        """The patches, from the entropy model's logits (no gradient through the decision)."""
        entropy = next_byte_entropy(gather_vocab(entropy_logits_local.detach(), self.dims).transpose(0, 1))  # [b, s]
        self.bridge.stats = {"next_byte_entropy": float(entropy.mean())}
        return segment(closes_patch(self.settings, entropy, position_ids), segment_ids)

    @torch.no_grad()
    def patches(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> Patches:
        """The patches of bytes ``[b, s]`` (a function of the bytes and the entropy model alone)."""
        position_ids = self._positions(input_ids, position_ids)
        return self._patches(self._entropy_logits(input_ids, segment_ids, position_ids), segment_ids, position_ids)

    @staticmethod
    def _positions(input_ids, position_ids):
        b, s = input_ids.shape
        return torch.arange(s, device=input_ids.device).expand(b, s) if position_ids is None else position_ids

    def _decoder_stream(self, input_ids, segment_ids, position_ids, sequence_type, labels=None):
        """Everything up to the decoder's output ``[s, b, d_local]``; with ``labels``, also the entropy model's
        share of the loss."""
        b, s = input_ids.shape
        position_ids = self._positions(input_ids, position_ids)
        entropy_logits = self._entropy_logits(input_ids, segment_ids, position_ids)  # [s, b, V / tp]
        entropy_loss = None
        if labels is not None and self.training and self.settings.entropy_loss_weight > 0:
            entropy_loss = self.entropy.language_model_loss(entropy_logits, labels) * self.settings.entropy_loss_weight
        patches = self._patches(entropy_logits, segment_ids, position_ids)
        # the local encoder, its outputs pooled per patch
        x, context = self.local.input_stream(input_ids, segment_ids, position_ids)
        x = x + self.bridge.type_embedding[self._type_ids(sequence_type, b, x.device)].to(x.dtype)[None]
        context.embeddings = x
        h = self.local.run_layers(x, context, self.encoder)  # [s, b, dl]
        p = pool(h.transpose(0, 1), patches) @ self.bridge.down.t().to(h.dtype)  # [b, P, D]
        docs = None if segment_ids is None else PackedDocuments.from_batch(patches.segment_ids, patches.position_ids)
        g = self.global_model(p.transpose(0, 1), docs, patches.segment_ids).transpose(0, 1)  # [b, P, D]
        self.bridge.record(patches, b * s)
        c = read_back(g, patches, self.bridge.none) @ self.bridge.up.t().to(g.dtype)  # [b, s, dl]
        return self.local.run_layers(h + c.transpose(0, 1), context, self.decoder), entropy_loss

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                sequence_type=None) -> torch.Tensor:
        """``sequence_type``: a name of ``SEQUENCE_TYPES`` or ``[b]`` indices (default:
        ``byte_latent.sequence_type``)."""
        y, entropy_loss = self._decoder_stream(input_ids, segment_ids, position_ids, sequence_type, labels)
        logits = self.local.logits_local(y, False)  # [s, b, V / tp]
        if labels is None:
            return gather_vocab(logits, self.dims).transpose(0, 1)
        loss = self.local.language_model_loss(logits, labels, self.label_smoothing if self.training else 0.0)
        if self.training:
            for extra in (entropy_loss, summed_auxiliary_loss(self)):
                loss = loss if extra is None else loss + extra
        return loss

    @property
    def features_width(self) -> int:
        """The width of ``features``' vectors (the local model's)."""
        return self.cfg.local_model.d_model

    def features(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, sequence_type=None) -> torch.Tensor:
        """One hidden vector per input byte ``[b, s, d_local]``: the decoder's output after its final norm (each
        byte's vector holds the finished patches it may read, mapped back to it)."""
        y, _ = self._decoder_stream(input_ids, segment_ids, position_ids, sequence_type)
        return self.local.final_norm(y).transpose(0, 1)

    def training_metrics(self) -> dict:
        """The patch statistics (``byte_latent/bridge/...``) and every reporting sublayer's metrics."""
        return reported_metrics(self)

    def auxiliary_loss(self, modules=None) -> torch.Tensor | None:
        return summed_auxiliary_loss(self, modules)

    # ---- decoding -----------------------------------------------------------------------------

    def init_state(self, batch: int, max_len: int, sequence_type=None) -> list:
        """One state per row (rows close patches at different bytes)."""
        types = self._type_ids(sequence_type, batch, "cpu")
        return [{"entropy": self.entropy.init_state(1, max_len), "local": self.local.init_state(1, max_len),
                 "global": self.global_model.init_state(1, max_len), "type": int(types[i]), "sum": None, "count": 0,
                 "closed": 0, "last": None, "starts": True} for i in range(batch)]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, max_len: int) -> tuple[torch.Tensor, list]:
        """A prompt ``[b, t]`` -> (logits ``[b, t, V]``, the state after it), as ``CausalLM.prefill``. Stepped byte by
        byte: where patches close is decided per byte and row, and the global model (with its merging) steps once
        per closed patch, so the state is that of the steps themselves."""
        state = self.init_state(input_ids.shape[0], max_len)
        return torch.stack([self.step(input_ids[:, t], state, t) for t in range(input_ids.shape[1])], 1), state

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: list, pos: int | torch.Tensor) -> torch.Tensor:
        """One byte per row ``[b]`` at position ``pos`` (one for the batch, or each row's own: ``LongTensor [b]``)
        -> next-byte logits ``[b, V]``; updates ``state``."""
        at = [pos] * len(state) if isinstance(pos, int) else [int(p) for p in pos]
        return torch.cat([self._step_row(tokens[i:i + 1], row, at[i]) for i, row in enumerate(state)])

    def _step_row(self, token: torch.Tensor, row: dict, pos: int) -> torch.Tensor:
        n_enc = self.settings.encoder_layers
        entropy_logits = self.entropy.step(token, row["entropy"], pos)  # [1, V]
        closes = bool(closes_patch(self.settings, next_byte_entropy(entropy_logits[None]), torch.tensor([[pos]]))[0, 0])
        x = self.local.embed_tokens(token[None, :])
        x = x + self.bridge.type_embedding[row["type"]].to(x.dtype)
        context = Context(embeddings=x, position=pos, tokens=token, embed=self.local.embed_tokens)
        h = x
        for layer, layer_state in zip(self.encoder, row["local"][:n_enc]):
            h = layer.step(h, layer_state, context)
        if row["starts"]:
            row["sum"], row["count"] = torch.zeros_like(h), 0
        row["sum"], row["count"] = row["sum"] + h, row["count"] + 1
        if closes:  # the patch is finished: the global model takes it
            p = (row["sum"] / row["count"]) @ self.bridge.down.t().to(h.dtype)
            row["last"] = self.global_model.step(p, row["global"], row["closed"])
            row["closed"] += 1
        row["starts"] = closes
        g = self.bridge.none.to(h.dtype)[None, None] if row["last"] is None else row["last"]
        y = h + g @ self.bridge.up.t().to(h.dtype)
        for layer, layer_state in zip(self.decoder, row["local"][n_enc:]):
            y = layer.step(y, layer_state, context)
        return gather_vocab(self.local.logits_local(y, False), self.dims)[0]

    # ---- size ---------------------------------------------------------------------------------

    def full_shapes(self) -> dict[str, torch.Size]:
        return {n: full_shape(p, self.dims) for n, p in self.named_parameters()}

    def num_parameters(self) -> int:
        return sum(s.numel() for s in self.full_shapes().values())

