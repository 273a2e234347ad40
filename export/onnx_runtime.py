"""Generation from an ``--format onnx`` export with onnxruntime: ``OnnxCausalLM`` is a decoder with the interface
``chimera.inference.generate`` drives (``prefill``, ``step``, the state's batch dimensions), running the two graphs.

Its decoding state is the flat list of tensors ``state.json`` names, at the export's ``max_len``: a longer generation
is refused. Where the prefill graph takes one token (``prefill_max_tokens: 1``, see ``chimera.export.onnx``), the
rest of the prompt steps through the decode graph.
Rows at different positions step in groups of one position (the decode graph takes one position for its batch).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from chimera.errors import UserError
from chimera.export.onnx import STATE_MANIFEST, batch_dims
from chimera.models.causal_lm import step_rows_apart


class OnnxCausalLM:
    """``prefill(input_ids [b, t], max_len)`` -> (logits ``[b, t, V]``, state) and ``step(token [b], state, pos)`` ->
    logits ``[b, V]`` (``state`` updated in place), from the graphs in ``export_dir``."""

    def __init__(self, export_dir: str | Path, threads: int | None = None):
        import onnxruntime

        export_dir = Path(export_dir)
        manifest_file = export_dir / STATE_MANIFEST
        if not manifest_file.is_file():
            raise UserError(f"{export_dir} has no {STATE_MANIFEST}: pass a directory written by "
                            "chimera export --format onnx")
        self.manifest = json.loads(manifest_file.read_text())
        self.max_len = int(self.manifest["max_len"])
        self.prefill_max_tokens = self.manifest.get("prefill_max_tokens")
        self.state_names = [entry["name"] for entry in self.manifest["state"]]
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self.prefill_session = onnxruntime.InferenceSession(str(export_dir / self.manifest["prefill"]), options,
                                                            providers=providers)
        self.decode_session = onnxruntime.InferenceSession(str(export_dir / self.manifest["decode"]), options,
                                                           providers=providers)
        # the batch dimension of each state tensor, where chimera.models.batch_state.state_layout looks for it
        self._state_layout = batch_dims(self.manifest["state"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def check_length(self, tokens: int) -> None:
        """``tokens`` (a prompt and its new tokens) fit the export's decoding cache, else a ``UserError``."""
        if tokens > self.max_len:
            raise UserError(f"{tokens} tokens (prompt and new ones) exceed the ONNX export's decoding cache of "
                            f"{self.max_len} tokens; generate fewer tokens or export again with a larger --max-len")

    def prefill(self, input_ids: torch.Tensor, max_len: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.check_length(max(max_len, input_ids.shape[1]))
        ids = input_ids.to(torch.long)
        first = ids if self.prefill_max_tokens is None else ids[:, : self.prefill_max_tokens]
        logits, *state = self.prefill_session.run(None, {"input_ids": first.numpy()})
        state = [torch.from_numpy(t) for t in state]
        logits = [torch.from_numpy(logits)]
        for pos in range(first.shape[1], ids.shape[1]):
            logits.append(self.step(ids[:, pos], state, pos)[:, None])
        return torch.cat(logits, dim=1), state

    def step(self, tokens: torch.Tensor, state: list[torch.Tensor], pos: int | torch.Tensor) -> torch.Tensor:
        if isinstance(pos, torch.Tensor):
            return step_rows_apart(self, tokens, state, pos)
        if not 1 <= pos < self.max_len:
            raise ValueError(f"position {pos}: the ONNX decode graph takes 1 <= position < {self.max_len}")
        feed = {"token": tokens.to(torch.long).numpy(), "position": np.array(pos, dtype=np.int64)}
        feed.update({name: t.numpy() for name, t in zip(self.state_names, state)})
        logits, *new = self.decode_session.run(None, feed)
        state[:] = [torch.from_numpy(t) for t in new]
        return torch.from_numpy(logits)


def load_onnx_model(export_dir: str | Path, threads: int | None = None) -> OnnxCausalLM:
    try:
        import onnxruntime  # noqa: F401
    except ModuleNotFoundError:
        raise UserError("--onnx needs onnxruntime: pip install 'chimera[onnx]'") from None
    return OnnxCausalLM(export_dir, threads)
