"""Bad input ends with one clear line on stderr, exit code 2, no traceback, nothing written.

The refusals that come before any work or process starts run the CLI's ``main`` in this process
(the ``run_here`` fixture: a fresh interpreter per case spent two seconds each importing torch); a missing config file,
a refusal said by launched ranks, and a run's summary go through a real process."""

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
def test_bad_train_input(tmp_path, run_here, args, expected):
    run_dir = tmp_path / "run"
    proc = run_here("train", TINY, "--run-dir", run_dir, *args)
    assert_user_error(proc, expected)
    assert not run_dir.exists()


def test_missing_config_file(tmp_path):
    proc = run_chimera("train", tmp_path / "missing.yaml", "--run-dir", tmp_path / "run")
    assert_user_error(proc, "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_broken_checkpoint_pointer(tmp_path, run_here):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/latest").write_text("step_00000009")
    proc = run_here("train", TINY, "--run-dir", tmp_path)
    assert_user_error(proc, "which is missing, and there is no other checkpoint")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "latest"]


def test_generate_without_checkpoint(tmp_path, run_here):
    proc = run_here("generate", tmp_path, "--prompt", "def ")
    assert_user_error(proc, "holds no checkpoint")


@pytest.fixture(scope="module")
def webdataset_dir(tmp_path_factory):
    from chimera.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("wds")
    (tmp / "doc.txt").write_text("def f(x):\n    return x\n" * 50)
    prepare([str(tmp / "doc.txt")], "bytes", "webdataset", str(tmp / "data"), progress=False)
    return tmp / "data"


@pytest.mark.parametrize("argv, expected", [
    (["train", TINY, "--run-dir", "/proc/x"], "--run-dir '/proc/x' cannot be written"),
    (["train", TINY, "--run-dir", REPO / "README.md" / "sub"], "cannot be written"),
    (["data", "prepare", REPO / "README.md", "--tokenizer", "bytes", "--format", "zarr", "--out", "/proc/x"],
     "--out '/proc/x' cannot be written"),
    (["export", REPO, "--out", "/proc/x"], "--out '/proc/x' cannot be written"),
    (["import-hf", REPO, "--out", "/proc/x"], "--out '/proc/x' cannot be written"),
    (["generate", REPO, "--prompt", "x", "--top-k", "-3"], "--top-k -3: must be at least 1"),
    (["checkpoint", "verify", REPO / "configs"], "holds no checkpoint"),
    (["train", TINY, "--run-dir", "RUN", "--restart", "--resume-from", "2"], "exclude each other"),
])
def test_bad_paths_and_arguments(tmp_path, run_here, argv, expected):
    proc = run_here(*[str(tmp_path / "run") if a == "RUN" else a for a in argv])
    assert_user_error(proc, expected)
    assert not (tmp_path / "run").exists()


def test_a_zarr_source_on_a_webdataset_directory(tmp_path, run_here, webdataset_dir):
    proc = run_here("train", TINY, "--run-dir", tmp_path / "run",
                       "--set", f"data.sources=[{{type: zarr, path: {webdataset_dir}}}]")
    assert_user_error(proc, "holds a webdataset dataset, not zarr; set type: webdataset")


def test_a_tensor_parallel_refusal_is_said_once(tmp_path):
    proc = run_chimera("train", TINY, "--run-dir", tmp_path / "run", "--nproc", 2, "--set", "parallel.tensor=2",
                       "--set", "model.num_heads=1", "--set", "model.head_dim=64")
    assert_user_error(proc, "parallel.tensor=2 does not divide model.num_heads=1")


def test_the_summary_says_higher_and_where_the_checkpoint_is(tmp_path):
    proc = run_chimera("train", TINY, "--run-dir", tmp_path / "a", "--set", "train.steps=1",
                       "--set", "train.warmup_steps=1", "--set", "train.eval_every=1", "--set", "train.eval_batches=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert "vs unigram baseline" in last and "% higher)" in last and "(-" not in last, last
    assert f"checkpoint in {tmp_path / 'a' / 'checkpoints'}" in last
    proc = run_chimera("train", TINY, "--run-dir", tmp_path / "b")  # eval_every: 0
    assert proc.stdout.strip().splitlines()[-1] == f"chimera: step 4; checkpoint in {tmp_path / 'b' / 'checkpoints'}"
    assert "built successfully" not in proc.stdout + proc.stderr  # DeepSpeed's op-build line
