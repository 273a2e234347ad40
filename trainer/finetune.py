"""``chimera finetune RUN_DIR --task TASK.yaml``: task heads trained on a pretrained model's features.

The task file names task directories (``chimera data genomic-tasks`` writes them: ``task.json``, ``train.npz``,
``heldout.npz``) with a loss weight each. Every step takes one batch of every task and minimises the weighted sum of
their losses (cross entropy for classification, mean squared error for regression) over the heads and, with
``train_backbone: true``, the model. Held-out metrics (accuracy, macro F1, MCC; MSE, Pearson r) go to
``OUT/<task>.json`` with the majority-class (or mean) baseline beside them.

A single-process loop of its own rather than the pretraining loop: the model is loaded whole
(``trainer.checkpoint.load_inference_model``: the checkpoint verified, the weights read layout-free), the batches are
small labelled arrays, not token streams, and nothing here is split over ranks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from chimera.configs.section import Section
from chimera.errors import UserError
from chimera.models.task_heads import KINDS, TaskHead


class TaskEntry(Section):
    data: str = Field(description="a task directory (task.json, train.npz, heldout.npz)")
    weight: float = Field(1.0, gt=0, description="the task's weight in the summed loss")
    name: str | None = None


class FinetuneConfig(Section):
    tasks: list[TaskEntry] = Field(min_length=1)
    steps: int = Field(200, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    train_backbone: bool = Field(True, description="false: only the heads train, the model's features are fixed")
    eval_batch_size: int = Field(128, ge=1)
    seed: int = 0


def load_task_config(path: str) -> FinetuneConfig:
    from chimera.configs.loader import _read_yaml, validated

    return validated(FinetuneConfig, _read_yaml(path), prefix="task file: ")


class Task:
    def __init__(self, entry: TaskEntry, where: str):
        root = self.root = Path(entry.data)
        meta_file = root / "task.json"
        if not meta_file.is_file():
            raise UserError(f"{where}.data: {str(root)!r} is not a task directory (no task.json); build one with "
                            "`chimera data genomic-tasks`")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("kind") not in KINDS:
            raise UserError(f"{meta_file}: kind {self.meta.get('kind')!r}; one of {KINDS}")
        self.kind, self.weight = self.meta["kind"], entry.weight
        self.name = entry.name or self.meta.get("task", root.name)
        self.num_classes = len(self.meta.get("classes", [])) or 1
        self.splits = {}
        for split in ("train", "heldout"):
            try:
                with np.load(root / f"{split}.npz") as z:
                    self.splits[split] = (torch.from_numpy(z["input_ids"].astype(np.int64)),
                                          torch.from_numpy(z["labels"]))
            except (OSError, KeyError, ValueError) as e:
                raise UserError(f"{root / (split + '.npz')}: missing or unreadable ({e}); rebuild the task") from None


def classification_metrics(pred: np.ndarray, true: np.ndarray, num_classes: int) -> dict:
    """Accuracy, macro F1 (classes absent from both ``pred`` and ``true`` left out) and the multiclass MCC
    (Gorodkin's R_K: (c s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)))."""
    pred, true = pred.reshape(-1), true.reshape(-1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(confusion, (true, pred), 1)
    tp, p, t = np.diag(confusion), confusion.sum(0), confusion.sum(1)
    present = (p + t) > 0
    f1 = np.where(present, 2 * tp / np.maximum(p + t, 1), 0.0)
    s, c = confusion.sum(), tp.sum()
    denominator = math.sqrt((s * s - (p * p).sum()) * (s * s - (t * t).sum()))
    return {"accuracy": float(c / s), "f1": float(f1[present].mean()),
            "mcc": float((c * s - (p * t).sum()) / denominator) if denominator else 0.0}


def regression_metrics(pred: np.ndarray, true: np.ndarray) -> dict:
    pred, true = pred.astype(np.float64), true.astype(np.float64)
    dp, dt = pred - pred.mean(), true - true.mean()
    norm = math.sqrt((dp * dp).sum() * (dt * dt).sum())
    return {"mse": float(((pred - true) ** 2).mean()), "pearson_r": float((dp * dt).sum() / norm) if norm else 0.0}


def metrics(kind: str, pred: np.ndarray, true: np.ndarray, num_classes: int) -> dict:
    return regression_metrics(pred, true) if kind == "regression" else classification_metrics(pred, true, num_classes)


def baseline(task: Task) -> dict:
    """The held-out metrics of the best constant answer learnt from the training labels (majority class, mean)."""
    train, held = task.splits["train"][1].numpy(), task.splits["heldout"][1].numpy()
    if task.kind == "regression":
        return metrics(task.kind, np.full(held.shape, train.mean()), held, 1)
    majority = np.bincount(train.reshape(-1), minlength=task.num_classes).argmax()
    return metrics(task.kind, np.full(held.shape, majority), held, task.num_classes)


class Finetuner(torch.nn.Module):
    """A model (anything with ``features(input_ids) -> [b, s, d]``) and one head per task."""

    def __init__(self, model: torch.nn.Module, tasks: list[Task], d_model: int):
        super().__init__()
        self.model = model
        self.heads = torch.nn.ModuleDict({t.name: TaskHead(t.kind, d_model, t.num_classes) for t in tasks})

    def forward(self, name: str, input_ids: torch.Tensor) -> torch.Tensor:
        return self.heads[name](self.model.features(input_ids))


def evaluate(net: Finetuner, task: Task, batch_size: int) -> dict:
    ids, labels = task.splits["heldout"]
    net.eval()
    with torch.no_grad():
        preds = [net.heads[task.name].predict(net(task.name, ids[i : i + batch_size]))
                 for i in range(0, len(ids), batch_size)]
    pred = torch.cat(preds).numpy()
    return metrics(task.kind, pred, labels.numpy(), task.num_classes)


def bases_as_model_ids(run_dir: str) -> torch.Tensor:
    """A table from the tasks' ``dna`` tokenizer ids (A, C, G, T, N) to the ids of the tokenizer the run was
    pretrained with (``data.tokenizer``: ``dna`` maps to itself, ``bytes`` to the letters' bytes), so that a byte-level
    model reads its own bytes; a tokenizer that does not spell each base as one token is refused."""
    from chimera.data.tokenizers import DNATokenizer, get_tokenizer
    from chimera.trainer.checkpoint import read_config, resolve_checkpoint

    spec = read_config(resolve_checkpoint(run_dir)).data.tokenizer
    tokenizer = get_tokenizer(spec)
    ids = [tokenizer.encode(base) for base in DNATokenizer.alphabet]
    if any(len(i) != 1 for i in ids):
        raise UserError(f"{run_dir} was pretrained with tokenizer {spec!r}, which does not spell each base as one "
                        "token; finetune a model pretrained with data.tokenizer=dna or bytes")
    return torch.tensor([int(i[0]) for i in ids], dtype=torch.long)


def finetune(run_dir: str, task_file: str, out: str | None = None) -> dict:
    from chimera.trainer.checkpoint import load_inference_model

    cfg = load_task_config(task_file)
    tasks = [Task(e, f"task file: tasks.{i}") for i, e in enumerate(cfg.tasks)]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise UserError(f"task file: tasks: two tasks are named alike ({names}); give one a `name:`")
    model = load_inference_model(run_dir)
    to_model = bases_as_model_ids(run_dir)
    for t in tasks:
        if int(t.splits["train"][0].max()) >= len(to_model):
            raise UserError(f"task {t.name!r} holds token ids up to {int(t.splits['train'][0].max())}, not bases of "
                            "the dna tokenizer; rebuild it with `chimera data genomic-tasks`")
        t.splits = {split: (to_model[ids], labels) for split, (ids, labels) in t.splits.items()}
    torch.manual_seed(cfg.seed)
    net = Finetuner(model, tasks, model.features_width)
    for p in net.model.parameters():
        p.requires_grad_(cfg.train_backbone)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    for step in range(1, cfg.steps + 1):
        net.train()
        total = torch.zeros(())
        for t in tasks:
            ids, labels = t.splits["train"]
            rows = torch.from_numpy(rng.integers(0, len(ids), size=cfg.batch_size))
            total = total + t.weight * net.heads[t.name].loss(net(t.name, ids[rows]), labels[rows])
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if step == 1 or step % 50 == 0 or step == cfg.steps:
            print(f"finetune step {step}/{cfg.steps}: weighted loss {total.item():.4f}", flush=True)
    out_dir = Path(out) if out else Path(run_dir) / "finetune"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for t in tasks:
        result = {"task": t.name, "kind": t.kind, "weight": t.weight, "steps": cfg.steps,
                  "heldout_examples": len(t.splits["heldout"][1]), "heldout": evaluate(net, t, cfg.eval_batch_size),
                  "baseline": baseline(t), "run_dir": str(run_dir), "task_data": str(t.root)}
        (out_dir / f"{t.name}.json").write_text(json.dumps(result, indent=1))
        results[t.name] = result
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result["heldout"].items())
        print(f"{t.name} ({t.kind}) held out: {shown} -> {out_dir / (t.name + '.json')}")
    return results
