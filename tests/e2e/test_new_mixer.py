"""Adding a mixer is one new file plus a preset: a copy of the package gets a toy mixer and its preset, nothing
else, and `chimera train` trains it at TP=2 (its split declared in its file), `chimera models` lists it."""

import os
import shutil
import sys
import textwrap

import torch

from helpers import REPO, read_metrics

TOY_MIXER = '''
"""A toy token mixer: a per-channel exponential moving average, to show that a mixer is one file.

    u_t = W_in x_t                                     # column parallel: channels split over TP ranks
    h_t = a * h_{t-1} + (1 - a) * u_t,   a = sigmoid(decay_logit)   (per channel; h = 0 before a document)
    out = W_out h_t                                    # row parallel: output reduced over TP ranks
"""

import torch
from pydantic import Field
from torch import nn

from chimera.models.scan import linear_scan
from chimera.models.spec import ContextParallel, SublayerConfig, SublayerSpec, divisibility
from chimera.parallel.layers import ColumnParallel, RowParallel
from chimera.parallel.sharding import declare, normal


class ToyEMAConfig(SublayerConfig):
    toy_width: int = Field(64, ge=1, description="channels of the moving average")


class ToyEMA(nn.Module):
    def __init__(self, c: ToyEMAConfig, build):
        super().__init__()
        local = build.dims.local(c.toy_width, "toy_width")
        self.w_in = ColumnParallel(c.d_model, c.toy_width, build.dims, init=normal(build.init_std))
        # [toy_width / tp]: split along dim 0, with W_in's output channels
        self.decay_logit = declare(nn.Parameter(torch.empty(local)), init=lambda t, g: t.fill_(2.0), split_dim=0,
                                   weight_decay=False)
        self.w_out = RowParallel(c.toy_width, c.d_model, build.dims, init=normal(build.out_std))

    def forward(self, x, docs=None):  # [s, b, d] -> [s, b, d]
        u = self.w_in(x)
        a = torch.sigmoid(self.decay_logit).expand_as(u)
        if docs is not None:
            a = a.masked_fill(docs.starts.unsqueeze(-1), 0.0)
        return self.w_out(linear_scan(a, (1 - torch.sigmoid(self.decay_logit)) * u))

    def init_state(self, batch, max_len):
        return {"h": torch.zeros(batch, self.decay_logit.shape[0])}

    def step(self, x, state, pos):  # x: [1, b, d]
        a = torch.sigmoid(self.decay_logit)
        state["h"] = a * state["h"] + (1 - a) * self.w_in(x)[0]
        return self.w_out(state["h"].unsqueeze(0))


SPECS = (SublayerSpec("T", "toy exponential moving average", ToyEMAConfig, ToyEMA,
                      lambda c, tp: divisibility(tp, {"model.toy_width": c.toy_width}),
                      lambda c: ContextParallel("state")),)
'''

TOY_PRESET = """
# A toy: exponential moving averages and gated MLPs (tests/e2e/test_new_mixer.py).
pattern: "T-"
num_layers: 8
vocab_size: 320
d_model: 64
mlp_hidden: 128
toy_width: 64
"""


def test_a_mixer_in_one_new_file_trains(tmp_path):
    package = tmp_path / "chimera"
    def not_the_package(folder, names):  # the package's own files only (runs/: training output at the top)
        skip = {".git", ".venv", "tests", "benchmarks", "__pycache__"} | ({"runs"} if folder == str(REPO) else set())
        return [n for n in names if n in skip or n.endswith(".egg-info")]

    shutil.copytree(REPO, package, ignore=not_the_package)
    before = {p.relative_to(package) for p in package.rglob("*")}
    (package / "models/mixers/toy_ema.py").write_text(textwrap.dedent(TOY_MIXER))
    (package / "configs/presets/toy-tiny.yaml").write_text(TOY_PRESET)
    added = {p.relative_to(package) for p in package.rglob("*")} - before
    assert {str(p) for p in added} == {"models/mixers/toy_ema.py", "configs/presets/toy-tiny.yaml"}

    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(tmp_path), WANDB_MODE="offline")  # `import chimera` is the copy

    def chimera(*args):
        return subprocess.run([sys.executable, "-m", "chimera.launch.cli", *map(str, args)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)

    listed = chimera("models")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert any(line.startswith("toy-tiny ") and "T-T-T-T-" in line for line in listed.stdout.splitlines())

    run = tmp_path / "run"
    proc = chimera("train", package / "configs/runs/tiny.yaml", "--run-dir", run, "--nproc", 2,
                   "--set", "model.preset=toy-tiny", "--set", "parallel.tensor=2", "--set", "train.steps=30",
                   "--set", "train.lr=0.005", "--set", "train.warmup_steps=5", "--set", "train.micro_batch_size=8",
                   "--set", "train.global_batch_size=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [r["loss"] for r in read_metrics(run)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    from chimera.trainer.checkpoint import read_weights

    weights = read_weights(run / "checkpoints/step_00000030")
    assert weights["layers.0.mixer.decay_logit"].shape == (64,)  # the full tensor, from both TP shards
    assert not torch.equal(weights["layers.0.mixer.decay_logit"], torch.full((64,), 2.0))  # it trained

    bad = chimera("train", package / "configs/runs/tiny.yaml", "--run-dir", tmp_path / "bad", "--nproc", 3,
                  "--set", "model.preset=toy-tiny", "--set", "parallel.tensor=3", "--set", "model.vocab_size=321",
                  "--set", "model.mlp_hidden=129")
    assert bad.returncode == 2 and "parallel.tensor=3 does not divide model.toy_width=64" in bad.stderr
