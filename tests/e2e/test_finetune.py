"""Genomic tasks from real genomes and `chimera finetune`: heads against closed forms, metrics against known answers,
held-out accuracy above the majority class, bad input."""

import json

import numpy as np
import pytest
import torch
from realdata import bacterial_genomes
from scipy.optimize import minimize

from chimera.models.task_heads import TaskHead
from chimera.trainer.finetune import classification_metrics, regression_metrics
from helpers import run_chimera


def test_metrics_on_known_answers():
    m = classification_metrics(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), 2)
    # confusion [[2, 1], [0, 1]]: F1 of class 0 = 4/5, of class 1 = 2/3; MCC = (2*1 - 1*0) / sqrt(3*1*2*2)
    assert m["accuracy"] == 0.75 and m["f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["mcc"] == pytest.approx(2 / np.sqrt(12))
    assert classification_metrics(np.array([2, 0, 1]), np.array([2, 0, 1]), 3)["mcc"] == pytest.approx(1.0)
    r = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0]))
    assert r["pearson_r"] == pytest.approx(1.0) and r["mse"] == pytest.approx((1 + 4 + 9) / 3)


def fit(head, features, labels, steps=300):
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = head.loss(head(features), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return head.loss(head(features), labels).item()


def test_regression_head_on_fixed_features_is_least_squares():
    torch.manual_seed(0)
    x = torch.randn(40, 7, 5, dtype=torch.float64)
    y = torch.randn(40, dtype=torch.float64)
    head = TaskHead("regression", 5).double()
    fit(head, x, y)
    design = torch.cat([x.mean(1), torch.ones(40, 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    torch.testing.assert_close(head.proj.weight[0].detach(), solution[:5], atol=1e-6, rtol=0)
    torch.testing.assert_close(head.proj.bias.detach(), solution[5:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["sequence_classification", "token_classification"])
def test_classification_heads_reach_the_logistic_optimum(kind):
    """Trained on fixed features, a head's loss equals the minimum of the same softmax cross entropy found by scipy
    on the pooled (sequence) or per-position (token) features."""
    torch.manual_seed(1)
    x = torch.randn(30, 4, 3, dtype=torch.float64)
    shape = (30,) if kind == "sequence_classification" else (30, 4)
    y = torch.randint(0, 3, shape)
    head = TaskHead(kind, 3, 3).double()
    ours = fit(head, x, y)
    assert head(x).shape == (*shape, 3)  # token heads: one prediction per input position
    feats = (x.mean(1) if kind == "sequence_classification" else x.reshape(-1, 3)).numpy()
    labels = y.reshape(-1).numpy()

    def objective(theta):
        w, b = theta[:9].reshape(3, 3), theta[9:]
        z = feats @ w.T + b
        z = z - z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(labels)), labels]))

    best = minimize(objective, np.zeros(12), method="BFGS", options={"gtol": 1e-10}).fun
    assert ours == pytest.approx(best, abs=1e-6)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    genomes, _real = bacterial_genomes()
    four = [genomes[k] for k in ("S.Aureus/COL", "H.Pylori/G27", "V.Cholerae/H1", "E.Coli/MG1655-K12")]
    out = tmp_path_factory.mktemp("tasks") / "t"
    proc = run_chimera("data", "genomic-tasks", *four, "--out", out, "--window", 64, "--per-genome", 60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_tasks_are_real_and_split_by_region(tasks):
    meta = json.loads((tasks / "species/task.json").read_text())
    assert meta["kind"] == "sequence_classification" and len(meta["classes"]) == 4
    for split in ("train", "heldout"):
        with np.load(tasks / f"gc/{split}.npz") as z:
            ids, gc = z["input_ids"], z["labels"]
        assert ids.shape == (240, 64)
        np.testing.assert_allclose(gc, ((ids == 1) | (ids == 2)).sum(1) / (ids < 4).sum(1), rtol=1e-6)
        with np.load(tasks / f"origin/{split}.npz") as z:
            labels = z["labels"]
        assert labels.shape == (240, 64) and (labels[:, 0] != labels[:, -1]).all()  # two genomes per read
    with np.load(tasks / "species/train.npz") as a, np.load(tasks / "species/heldout.npz") as b:
        train = {r.tobytes() for r in a["input_ids"]}
        assert not train & {r.tobytes() for r in b["input_ids"]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from chimera.configs.loader import load_model_config
    from chimera.models.causal_lm import build_model
    from chimera.trainer.checkpoint import write_weights_checkpoint

    cfg = load_model_config("transformer-tiny")
    model = build_model(cfg, seed=0)
    path = tmp_path_factory.mktemp("pre") / "run"
    write_weights_checkpoint(path, cfg, {k: v.detach() for k, v in model.state_dict().items()}, "test preset")
    return path


def test_finetune_beats_the_majority_class_on_held_out_windows(tasks, run_dir, tmp_path):
    spec = tmp_path / "task.yaml"
    spec.write_text(f"tasks:\n- {{data: '{tasks / 'species'}', weight: 1.0}}\n- {{data: '{tasks / 'gc'}', "
                    "weight: 1.0}\nsteps: 150\nbatch_size: 16\nlr: 0.001\n")
    proc = run_chimera("finetune", run_dir, "--task", spec, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    species = json.loads((tmp_path / "out/species.json").read_text())
    assert species["baseline"]["accuracy"] == 0.25
    assert species["heldout"]["accuracy"] >= species["baseline"]["accuracy"] + 0.15  # the margin
    gc = json.loads((tmp_path / "out/gc.json").read_text())
    assert gc["heldout"]["mse"] < gc["baseline"]["mse"]


@pytest.mark.parametrize("body, message", [
    ("tasks: []\n", "tasks: bad value"),
    ("tasks:\n- {data: DIR, weight: 0}\n", "tasks.0.weight: bad value"),
    ("tasks:\n- {data: DIR}\nsteps: 0\n", "steps: bad value"),
    ("tasks:\n- {data: DIR}\nlr: -1\n", "lr: bad value"),
    ("tasks:\n- {data: DIR}\nbatch_size: 0\n", "batch_size: bad value"),
    ("tasks:\n- {data: DIR}\neval_batch_size: 0\n", "eval_batch_size: bad value"),
    ("tasks:\n- {data: DIR}\nweight_decay: -1\n", "weight_decay: bad value"),
    ("tasks:\n- {data: DIR}\ntrain_backbone: maybe\n", "train_backbone: bad value"),
    ("tasks:\n- {data: DIR}\nseed: x\n", "seed: bad value"),
    ("tasks:\n- {data: DIR}\nstepz: 3\n", "stepz: unknown field"),
    ("tasks:\n- {data: /nonexistent}\n", "not a task directory"),
])
def test_bad_task_file_is_one_line(tasks, run_dir, tmp_path, run_here, body, message):
    spec = tmp_path / "task.yaml"
    spec.write_text(body.replace("DIR", str(tasks / "species")))
    proc = run_here("finetune", run_dir, "--task", spec)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--window", "4"], "--window 4"), (["--per-genome", "0"], "--per-genome 0"), (["--heldout", "1"], "--heldout 1"),
    (["--window", "x"], "invalid int"), (["--seed", "x"], "invalid int")])
def test_bad_genomic_tasks_arguments_are_one_line(tmp_path, args, message):
    genomes, _ = bacterial_genomes()
    two = list(genomes.values())[:2]
    proc = run_chimera("data", "genomic-tasks", *two, "--out", tmp_path / "t", *args)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not (tmp_path / "t").exists()


def test_finetune_of_a_missing_run_or_task_file_is_one_line(tmp_path, run_here, run_dir):
    proc = run_here("finetune", run_dir, "--task", tmp_path / "none.yaml")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_here("finetune", run_dir)
    assert proc.returncode == 2 and "--task" in proc.stderr


def test_features_are_the_final_norm_output_the_logits_read():
    """One vector per input token; the language-model head applied to them gives forward's logits."""
    from chimera.configs.loader import load_model_config
    from chimera.models.causal_lm import build_model

    model = build_model(load_model_config("transformer-tiny"), seed=0).eval()
    ids = torch.randint(0, 6, (2, 17))
    with torch.no_grad():
        h = model.features(ids)
        assert h.shape == (2, 17, model.embed.weight.shape[1])
        logits = model.numerics.logits(h @ model.embed.weight.t() if model.head is None else model.head(h))
        torch.testing.assert_close(logits, model(ids))


def test_a_byte_model_reads_the_bases_as_its_own_bytes(run_dir):
    from chimera.trainer.finetune import bases_as_model_ids

    assert bases_as_model_ids(run_dir).tolist() == [ord(c) for c in "ACGTN"]  # the run's tokenizer: bytes


def test_token_heads_on_hyena_glt_give_one_prediction_per_input_base():
    """Through patches and token merging, the token head predicts every base; the sequence head one per window."""
    from chimera.configs.loader import load_model_config
    from chimera.models.causal_lm import build_model

    cfg = load_model_config("hyena-glt-tiny", ["byte_latent.token_merging=true", "byte_latent.merge_threshold=0.0"])
    model = build_model(cfg, seed=0).eval()
    ids = torch.tensor([[ord(c) for c in "ACGTTGCAAC" * 5]] * 3)
    token, sequence = TaskHead("token_classification", model.features_width, 4), \
        TaskHead("sequence_classification", model.features_width, 4)
    h = model.features(ids)
    merged = model.training_metrics()["byte_latent/global_model.merge/merged_length"]
    assert merged < float(model.patches(ids).count.float().mean())  # merging shortened the patch sequence
    assert token.predict(token(h)).shape == ids.shape and sequence.predict(sequence(h)).shape == (3,)
