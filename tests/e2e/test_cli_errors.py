"""Bad input ends with one clear line on stderr, exit code 2, no traceback, nothing written."""

import pytest

from helpers import REPO, run_chimera

TINY = REPO / "configs/runs/tiny.yaml"


def assert_user_error(proc, expected):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("chimera: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert expected in lines[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "model.preset=griffin-enormous"], "unknown model preset 'griffin-enormous'"),
        (["--set", "train.lr=fast"], "train.lr: bad value 'fast'"),
        (["--set", "train.warmup=3"], "train.warmup: unknown field"),
        (["--set", "parallel.tensor=3", "--nproc", "3"], "parallel.tensor=3 does not divide model.num_heads=4"),
        (["--set", "parallel.tensor=2", "--nproc", "3"],
         "world size 3 does not factor into tensor x context x pipeline x data = 2 x 1 x 1 x data"),
        (["--nproc", "zero"], "invalid int value"),
        # bad layouts: one line, before any process starts
        (["--set", "model.pattern=R-R-|L-", "--set", "parallel.pipeline=3", "--nproc", "3"],
         "marks 2 pipeline stages with '|' but parallel.pipeline=3"),
        (["--set", "model.pattern=R-R-L-", "--set", "parallel.pipeline=8", "--nproc", "8"],
         "parallel.pipeline=8 stages but the model has only 6 layers"),
        (["--set", "model.pattern=R-||R-L-"], "pipeline stage 1 has no layers"),
        (["--set", "model.preset=jamba-tiny", "--set", "parallel.expert=3", "--nproc", "3"],
         "parallel.expert=3 does not divide model.moe_experts=4"),
        (["--set", "parallel.expert=2", "--nproc", "2"],
         "parallel.expert=2 but the model has no sublayer with experts"),
        (["--set", "parallel.context=3", "--nproc", "3"], "parallel.context=3 does not divide the sequence length 64"),
        (["--set", "parallel.pipeline=2", "--set", "parallel.zero_stage=2", "--nproc", "2"],
         "DeepSpeed's pipeline engine runs ZeRO stage 0 or 1 only"),
        (["--set", "model.preset=jamba-tiny", "--set", "parallel.expert=2", "--set", "parallel.zero_stage=3",
          "--nproc", "2"], "DeepSpeed's ZeRO-3 does not partition expert-parallel parameters"),
    ],
)
def test_bad_train_input(tmp_path, args, expected):
    run_dir = tmp_path / "run"
    proc = run_chimera("train", TINY, "--run-dir", run_dir, *args)
    assert_user_error(proc, expected)
    assert not run_dir.exists()


def test_missing_config_file(tmp_path):
    proc = run_chimera("train", tmp_path / "missing.yaml", "--run-dir", tmp_path / "run")
    assert_user_error(proc, "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_broken_checkpoint_pointer(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/latest").write_text("step_00000009")
    proc = run_chimera("train", TINY, "--run-dir", tmp_path)
    assert_user_error(proc, "missing or incomplete")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "latest"]


def test_generate_without_checkpoint(tmp_path):
    proc = run_chimera("generate", tmp_path, "--prompt", "def ")
    assert_user_error(proc, "holds no checkpoint")
