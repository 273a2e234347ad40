"""Run by tests under 1 or 2 ranks: logits, loss and full gradients of several models at a TP layout (with 2 ranks,
without and with sequence parallelism).

usage: tp_worker.py TP OUT.pt PRESET...   (a PRESET may carry model overrides: ``name+field=value+field=value``)

Saved (rank 0): ``{(preset, sequence_parallel): {"logits", "loss", "grads"}}``.
"""

import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from chimera.configs.loader import load_model_config  # noqa: E402
from chimera.parallel import topology  # noqa: E402
from chimera.parallel.sharding import full_state_dict  # noqa: E402
from helpers import build_model  # noqa: E402


def splits_sequences(preset: str, overrides: list[str]) -> bool:
    """False for models that refuse sequence parallelism: byte-latent ones, and those with a kind that needs whole
    sequences on a rank."""
    from chimera.models import registry
    cfg = load_model_config(preset, overrides)
    return cfg.byte_latent is None and not any(registry.sublayers()[k].whole_sequence for k in cfg.kinds())


tp, out, presets = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
topo = topology.initialize(tensor=tp)
results = {}
for preset in presets:
    name, *overrides = preset.split("+")
    for sp in (False, True) if tp > 1 and splits_sequences(name, overrides) else (False,):
        torch.manual_seed(0)
        model = build_model(name, seed=3, overrides=overrides, dims=topo.dims(sequence_parallel=sp))
        ids = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(5))
        logits = model(ids)
        loss = model(ids, labels=torch.roll(ids, -1, dims=1))
        loss.backward()
        grads = full_state_dict(model, model.dims, of=lambda p: p.grad)
        results[preset, sp] = {"logits": logits.detach(), "loss": loss.detach(), "grads": grads}
if topo.rank == 0:
    torch.save(results, out)
topology.shutdown()
