"""``--format onnx``: two graphs and the manifest of the decoding state between them.

* ``prefill.onnx``: ``input_ids [batch, t]`` -> ``logits [batch, t, V]`` and every tensor of the decoding state that
  ``CausalLM.prefill(input_ids, max_len)`` returns;
* ``decode.onnx``: ``token [batch]``, ``position []`` (int64, ``1 <= position < max_len``) and every state tensor ->
  ``logits [batch, V]`` and every state tensor as ``CausalLM.step`` leaves it;
* ``state.json``: the state's tensors in graph order (their names, shapes with ``"batch"`` / ``"max_len"`` where those
  go, dtypes), ``max_len`` (the decoding cache's length, fixed at export) and ``prefill_max_tokens`` (1 where the
  prefill graph takes one token and the rest of the prompt steps through ``decode.onnx``, see below).

The decoding state (a list per layer of mixer-specific tensors and dicts: RG-LRU / Mamba / S5 / RWKV states, conv
tails, ring-buffer and global KV caches with their slot positions, Hyena's long-convolution inputs) is flattened into
named tensors (``flatten_state``; ``unflatten_state`` puts them back into the nested form ``init_state`` gives).
Where a step updates the state in place, the graph takes the old tensors as inputs and returns the new ones as outputs
(``DecodeGraph``: clone, step, return). Every state tensor is real: complex states (S5's, Hyena's modal filters')
are held as real pairs ``[..., 2]`` by the mixers themselves, since ONNX has no complex element type.

Exporter: the dynamo exporter (``torch.onnx.export(..., dynamo=True)`` of a ``torch.export`` program). The legacy
TorchScript exporter (``dynamo=False``) records the decoding position as a constant: every ``pos``-dependent index
(the ring-buffer slot, RoPE's angle, ``[:, : pos + 1]``) would be frozen at the traced position. ``torch.export``
keeps the position symbolic (``position.item()`` with its range checked), and the batch and prompt length dynamic.

A mixer whose prefill steps through the prompt (a capacity-limited MoE, the routed hybrid: which tokens an expert or a
path takes depends on the tokens routed before) has a Python loop over the prompt length, which a graph with a
symbolic length cannot hold; its prefill graph is exported for one token (``prefill_max_tokens: 1``) and the runner
(``chimera.export.onnx_runtime.OnnxCausalLM``, ``chimera generate --onnx``) steps the rest of the prompt through
``decode.onnx``, giving the same state by definition. MoE layers are traced in their dense form (every expert on
every token, weighted by the routing: ``chimera.models.channels.moe.dense_experts``), Hyena's FFT convolution as the
direct one (``chimera.models.mixers.hyena.long_conv``): ONNX has no complex tensors.

S5 and the modal Hyena filter compute their complex numbers in real pairs (``chimera.models.complex_pairs``; S5's
scan runs on the pairs while exporting) and BigBird's block table for ``max_len`` is built by its ``init_state``,
which ``state_layout`` calls before tracing: a constant of the graphs, not a traced ``randperm``; the routed hybrid's
compressed SSM state keeps the dimensions chosen from the weights at export (a constant too). Refused (one line): the
byte-latent models (``refusal``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from chimera.export.graph_scan import graph_scans
from chimera.export.symbolic_index import SymbolicIndexing

STATE_MANIFEST = "state.json"
PREFILL, DECODE = "prefill.onnx", "decode.onnx"
OPSET = 18
DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int64: "int64",
          torch.int32: "int32", torch.bool: "bool"}


# ---- the state as a flat list of named tensors --------------------------------------------------------------------

def state_leaves(state, path: str = "state") -> list[tuple[str, object]]:
    """``(name, leaf)`` of every leaf of a nested decoding state, in order: tensors, and whatever else it holds."""
    if isinstance(state, dict):
        return [x for k, v in state.items() for x in state_leaves(v, f"{path}.{k}")]
    if isinstance(state, (list, tuple)):
        return [x for i, v in enumerate(state) for x in state_leaves(v, f"{path}.{i}")]
    return [(path, state)]


def flatten_state(state) -> list[torch.Tensor]:
    """The tensors of a nested state, in order (the ``None`` of stateless sublayers left out)."""
    return [leaf for _, leaf in state_leaves(state) if isinstance(leaf, torch.Tensor)]


def state_names(state) -> list[str]:
    return [name for name, leaf in state_leaves(state) if isinstance(leaf, torch.Tensor)]


def unflatten_state(template, tensors):
    """The nested state of ``template``'s structure (e.g. ``init_state``'s) holding ``tensors`` in order."""
    it = iter(tensors)

    def rebuild(node):
        if isinstance(node, dict):
            return {k: rebuild(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(rebuild(v) for v in node)
        return next(it) if isinstance(node, torch.Tensor) else node

    out = rebuild(template)
    if next(it, None) is not None:
        raise ValueError("more tensors than the state's structure holds")
    return out


# ---- the graphs' modules ------------------------------------------------------------------------------------------

class PrefillGraph(nn.Module):
    """``input_ids [b, t]`` -> ``(logits [b, t, V], *state tensors)``: ``CausalLM.prefill`` flattened."""

    def __init__(self, model: nn.Module, max_len: int):
        super().__init__()
        self.model, self.max_len = model, max_len

    def forward(self, input_ids: torch.Tensor):
        with SymbolicIndexing():
            logits, state = self.model.prefill(input_ids, self.max_len)
        return logits, *flatten_state(state)


class DecodeGraph(nn.Module):
    """``(token [b], position [], *state tensors)`` -> ``(logits [b, V], *new state tensors)``: ``CausalLM.step`` made
    functional (the inputs cloned, stepped in place, returned)."""

    def __init__(self, model: nn.Module, template, max_len: int):
        super().__init__()
        self.model, self.template, self.max_len = model, template, max_len

    def forward(self, token: torch.Tensor, position: torch.Tensor, *tensors: torch.Tensor):
        state = unflatten_state(self.template, [t.clone() for t in tensors])
        pos = position.item()
        torch._check(pos >= 1)  # position 0 is a one-token prefill (RG-LRU and S5 reset their state there)
        torch._check(pos < self.max_len)
        with SymbolicIndexing():
            logits = self.model.step(token, state, pos)
        return logits, *flatten_state(state)


# ---- the manifest -------------------------------------------------------------------------------------------------

def state_layout(model: nn.Module, max_len: int) -> list[dict]:
    """Each state tensor's name, shape (``"batch"`` / ``"max_len"`` at the dimensions that grow with them, found by
    building the state at two batches and two lengths) and dtype."""
    base, wider, longer = (model.init_state(b, n) for b, n in ((2, max_len), (3, max_len), (2, max_len + 1)))
    names = state_names(base)
    layout = []
    for name, t, w, n in zip(names, flatten_state(base), flatten_state(wider), flatten_state(longer)):
        shape = ["batch" if a != b else "max_len" if a != c else a for a, b, c in zip(t.shape, w.shape, n.shape)]
        layout.append({"name": name, "shape": shape, "dtype": DTYPES[t.dtype]})
    return layout


def batch_dims(layout: list[dict]) -> list[int | None]:
    """The batch dimension of each state tensor (None: shared by the batch)."""
    return [entry["shape"].index("batch") if "batch" in entry["shape"] else None for entry in layout]


# ---- refusal and writing ------------------------------------------------------------------------------------------

def refusal(source) -> str | None:
    cfg = source.model_cfg
    if cfg.byte_latent is not None:
        return ("the byte-latent model (model.byte_latent) cannot be exported to ONNX: its decoding closes patches "
                "where the entropy model decides, per row, with Python counters in its state (a data-dependent "
                "control flow a static graph cannot express); export it as --format safetensors or hf")
    return None


def default_max_len(source) -> int:
    """The decoding cache's length when not chosen: the training sequence length, at least 256."""
    return max(256, int(source.run.data.seq_len))


def write(source, out_dir: Path, dtype: torch.dtype, *, max_len: int | None = None) -> None:
    from chimera.errors import UserError

    if dtype != torch.float32:
        raise UserError(f"--format onnx --dtype {DTYPES.get(dtype, dtype)}: only fp32 is written (onnxruntime's "
                        "CPU provider lacks half-precision kernels for several of the graphs' operators); use "
                        "--dtype fp32")
    reason = refusal(source)
    if reason is not None:
        raise UserError(reason)
    export_model(source.build_model(), Path(out_dir), max_len or default_max_len(source))


def export_model(model: nn.Module, out_dir: Path, max_len: int) -> dict:
    """Write ``prefill.onnx``, ``decode.onnx`` and ``state.json`` for ``model`` (fp32, eval) into ``out_dir``;
    returns the manifest."""
    model = model.eval()
    layout = state_layout(model, max_len)
    names = [entry["name"] for entry in layout]
    batch = torch.export.Dim("batch", min=1, max=1024)

    prefill_tokens = write_prefill(model, out_dir / PREFILL, max_len, names, batch)

    template = model.init_state(1, max_len)
    sample_state = flatten_state(model.init_state(2, max_len))
    state_shapes = [{d: batch} if d is not None else None for d in batch_dims(layout)]
    sample = (torch.zeros(2, dtype=torch.long), torch.tensor(1), *sample_state)
    program = torch.export.export(DecodeGraph(model, template, max_len), sample, strict=False,
                                  dynamic_shapes=({0: batch}, None, tuple(state_shapes)))
    onnx_program = torch.onnx.export(program, dynamo=True, opset_version=OPSET,
                                     input_names=["token", "position", *names],
                                     output_names=["logits", *(f"new.{n}" for n in names)])
    onnx_program.save(str(out_dir / DECODE))

    manifest = {"format": "chimera-onnx", "version": 1, "max_len": max_len, "prefill_max_tokens": prefill_tokens,
                "vocab_size": model.cfg.vocab_size, "prefill": PREFILL, "decode": DECODE,
                "decode_inputs": ["token", "position", "<state>"], "state": layout}
    (out_dir / STATE_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def write_prefill(model: nn.Module, path: Path, max_len: int, names: list[str], batch) -> int | None:
    """The prefill graph, for any prompt length up to ``max_len`` where the model's prefill is one parallel pass
    (returns None), else for one token (returns 1)."""
    graph = PrefillGraph(model, max_len)
    kwargs = {"input_names": ["input_ids"], "output_names": ["logits", *names]}
    try:
        length = torch.export.Dim.DYNAMIC
        with graph_scans(max_len):
            program = torch.export.export(graph, (torch.zeros(2, 3, dtype=torch.long),), strict=False,
                                          dynamic_shapes=({0: batch, 1: length},))
        tokens = None
    except Exception:  # a prefill that steps through the prompt: a loop over its length (see the module docstring)
        program = torch.export.export(graph, (torch.zeros(2, 1, dtype=torch.long),), strict=False,
                                      dynamic_shapes=({0: batch},))
        tokens = 1
    torch.onnx.export(program, dynamo=True, opset_version=OPSET, **kwargs).save(str(path))
    return tokens
