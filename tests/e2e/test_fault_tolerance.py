"""A run survives faults and its records stay one trajectory: a rank killed with SIGKILL (the local launcher restarts
the run from its last valid checkpoint), corrupt checkpoints (skipped, the previous valid one used), a full or
read-only disk (training goes on), Ctrl-C (a checkpoint at the last step, no traceback), asynchronous saves.

Each recovered run is held to an uninterrupted run of the same command: per-step losses within 1e-6."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from chimera.trainer import events
from helpers import REPO, read_metrics, run_chimera, run_chimera_here

TINY = REPO / "configs/runs/tiny.yaml"
TWO_RANKS = ["--nproc", 2, "--set", "train.micro_batch_size=2", "--set", "train.steps=8", "--set", "checkpoint.every=2",
             "--set", "logging.progress=false", "--set", "data.log_samples=true"]
ONE_RANK = ["--set", "train.steps=8", "--set", "checkpoint.every=2", "--set", "checkpoint.keep=3",
            "--set", "logging.progress=false"]
FIRST_SIX = ["--set", "train.stop_after=6"]


def start(run_dir, *args) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return subprocess.Popen([sys.executable, "-m", "chimera.launch.cli", "train", str(TINY), "--run-dir", str(run_dir),
                             *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run_dir, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def rank_pid(launcher_pid: int, rank: int) -> int:
    for child in subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split():
        if f"RANK={rank}" in open(f"/proc/{child}/environ").read().split("\0"):
            return int(child)
    raise LookupError(f"no rank {rank} under {launcher_pid}")


def assert_same_losses(got, expected):
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), a["step"]
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12), a["step"]


def samples(run_dir) -> list:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted_two_ranks(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    proc = run_chimera("train", TINY, "--run-dir", run_dir, *TWO_RANKS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("kill_after", [1, 4])  # before any checkpoint; just after one
def test_a_killed_rank_restarts_the_run_from_its_last_checkpoint(tmp_path, uninterrupted_two_ranks, kill_after):
    proc = start(tmp_path, *TWO_RANKS)
    wait_for_step(tmp_path, kill_after, proc)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "rank 1 was killed by SIGKILL; restarting from the last valid checkpoint" in err
    assert_same_losses(read_metrics(tmp_path), read_metrics(uninterrupted_two_ranks))
    assert samples(tmp_path) == samples(uninterrupted_two_ranks)  # no sample lost or repeated
    log = events.read(tmp_path)
    assert [e["event"] for e in log[:3]] == ["failure", "relaunch", "resume"], (log, err[-3000:])


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    """An 8-step run stopped after step 6, with checkpoints at 2, 4, 6; and the same run uninterrupted."""
    base = tmp_path_factory.mktemp("base")
    proc = run_chimera("train", TINY, "--run-dir", base / "run", *ONE_RANK, *FIRST_SIX)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_chimera("train", TINY, "--run-dir", base / "longer", *ONE_RANK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base


def corrupt(run_dir, mode: str) -> str:
    """Damage the newest checkpoint (step 6) one way; what the resume must say."""
    ckpt = run_dir / "checkpoints/step_00000006"
    data = sorted((ckpt / "tensors/rank_00000.zarr").rglob("c/*"))[0]
    if mode == "truncated tensor file":
        data.write_bytes(data.read_bytes()[:-100])
        return "(truncated?)"
    if mode == "flipped bytes":
        raw = bytearray(data.read_bytes())
        raw[10:14] = bytes(b ^ 0xFF for b in raw[10:14])
        data.write_bytes(bytes(raw))
        return "does not match its checksum"
    if mode == "deleted file":
        (ckpt / "tensors/rank_00000.index.json").unlink()
        return "file tensors/rank_00000.index.json is missing"
    if mode == "deleted manifest":
        (ckpt / "MANIFEST.json").unlink()
        return "MANIFEST.json is missing"
    if mode == "garbage trainer state":
        (ckpt / "trainer_state.json").write_text("{not json")
        return "trainer_state.json"
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["truncated tensor file", "flipped bytes", "deleted file", "deleted manifest",
                                  "garbage trainer state"])
def test_a_corrupt_checkpoint_is_skipped_and_the_previous_one_used(tmp_path, one_rank_run, mode):
    run_dir = tmp_path / "run"
    shutil.copytree(one_rank_run / "run", run_dir)
    said = corrupt(run_dir, mode)
    proc = run_chimera("train", TINY, "--run-dir", run_dir, *ONE_RANK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = [line for line in (proc.stdout + proc.stderr).splitlines() if "step_00000006 skipped" in line]
    assert skipped and said in skipped[0], proc.stdout + proc.stderr
    assert "resumed at step 4" in proc.stdout
    assert_same_losses(read_metrics(run_dir), read_metrics(one_rank_run / "longer"))  # one trajectory, 1..8


def test_a_dangling_latest_is_said_and_the_newest_valid_checkpoint_used(tmp_path, one_rank_run):
    run_dir = tmp_path / "run"
    shutil.copytree(one_rank_run / "run", run_dir)
    (run_dir / "checkpoints/latest").write_text("step_00000099")
    shutil.rmtree(run_dir / "checkpoints/step_00000006")
    proc = run_chimera("train", TINY, "--run-dir", run_dir, *ONE_RANK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "names 'step_00000099', which does not exist" in proc.stdout
    assert "resumed at step 4" in proc.stdout
    assert_same_losses(read_metrics(run_dir), read_metrics(one_rank_run / "longer"))


def test_a_deleted_latest_resumes_from_the_newest_valid_checkpoint(tmp_path, one_rank_run):
    run_dir = tmp_path / "run"
    shutil.copytree(one_rank_run / "run", run_dir)
    (run_dir / "checkpoints/latest").unlink()
    proc = run_chimera("train", TINY, "--run-dir", run_dir, *ONE_RANK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed at step 6" in proc.stdout
    assert_same_losses(read_metrics(run_dir), read_metrics(one_rank_run / "longer"))


def test_no_valid_checkpoint_is_refused_not_restarted(tmp_path, one_rank_run):
    run_dir = tmp_path / "run"
    shutil.copytree(one_rank_run / "run", run_dir)
    for step in (2, 4, 6):
        (run_dir / f"checkpoints/step_{step:08d}/MANIFEST.json").unlink()
    before = sorted(p.name for p in run_dir.rglob("*"))
    proc = run_chimera("train", TINY, "--run-dir", run_dir, *ONE_RANK)
    assert proc.returncode == 2
    assert "no usable checkpoint" in proc.stderr.strip().splitlines()[-1] and "--restart" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in run_dir.rglob("*")) == before


@pytest.fixture
def small_disk(tmp_path):
    """A 2.5 MiB tmpfs: one tiny checkpoint (1.7 MiB) fits, a second does not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    assert done.returncode == 0, f"this test mounts a tmpfs (as root): {done.stderr}"
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_does_not_stop_training_nor_remove_the_previous_checkpoint(small_disk):
    run_dir = small_disk / "run"
    proc = run_chimera("train", TINY, "--run-dir", run_dir, *ONE_RANK, *FIRST_SIX)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]  # every step trained
    failed = [line for line in proc.stdout.splitlines() if "not saved" in line]
    assert len(failed) == 2 and "No space left on device" in failed[0], proc.stdout  # steps 4 and 6
    assert "training continues and the next save tries again" in failed[0]
    assert [r.get("checkpoint_failures", 0) for r in read_metrics(run_dir)] == [0, 0, 0, 0, 1, 1]
    # the final checkpoint could not be written: one line, exit 2; the step-2 checkpoint is whole and latest
    assert proc.returncode == 2 and "could not be written" in proc.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    verify = run_chimera_here("checkpoint", "verify", run_dir)
    assert verify.returncode == 0 and "step_00000002: valid" in verify.stdout


def test_a_read_only_checkpoint_directory_does_not_stop_training(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(run_dir / "checkpoints")], check=True)
    try:
        proc = run_chimera("train", TINY, "--run-dir", run_dir, *ONE_RANK, *FIRST_SIX)
    finally:
        subprocess.run(["umount", str(run_dir / "checkpoints")], check=True)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert sum("Read-only file system" in line for line in proc.stdout.splitlines()) == 3, proc.stdout
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_saves_at_the_step_it_reached_and_exits_75(tmp_path, nproc):
    extra = ["--nproc", nproc, "--set", "train.micro_batch_size=2"] if nproc == 2 else []
    proc = start(tmp_path, "--set", "train.steps=100000", "--set", "checkpoint.every=0",
                 "--set", "logging.progress=false", *extra)
    wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = read_metrics(tmp_path)[-1]["step"]
    saved = json.loads((tmp_path / f"checkpoints/step_{last:08d}/trainer_state.json").read_text())
    assert saved["step"] == last >= 3
    assert f"stopped after step {last} (SIGINT)" in out


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    proc = start(tmp_path, "--set", "train.steps=100000", "--set", "checkpoint.every=0",
                 "--set", "logging.progress=false", "--set", "model.preset=griffin-small", "--set", "data.seq_len=512",
                 "--set", "train.micro_batch_size=8", "--set", "train.global_batch_size=8")
    wait_for_step(tmp_path, 1, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # signals do not queue: the second must come after the first was handled
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err


def test_asynchronous_saves_equal_synchronous_ones(tmp_path, one_rank_run):
    import torch

    from chimera.trainer.checkpoint import read_weights

    proc = run_chimera("train", TINY, "--run-dir", tmp_path, *ONE_RANK, *FIRST_SIX, "--set", "checkpoint.async=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_losses(read_metrics(tmp_path), read_metrics(one_rank_run / "run"))
    for step in (2, 4, 6):
        ours = read_weights(tmp_path / f"checkpoints/step_{step:08d}")
        theirs = read_weights(one_rank_run / f"run/checkpoints/step_{step:08d}")
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert run_chimera_here("checkpoint", "verify", tmp_path).returncode == 0


def test_a_crash_during_an_asynchronous_save_leaves_the_previous_checkpoint(tmp_path):
    args = ["--set", "model.preset=griffin-small", "--set", "train.steps=6", "--set", "checkpoint.every=1",
            "--set", "checkpoint.async=true", "--set", "logging.progress=false", "--set", "train.micro_batch_size=2",
            "--set", "train.global_batch_size=2"]
    proc = start(tmp_path, *args)
    wait_for_step(tmp_path, 2, proc)
    checkpoints = tmp_path / "checkpoints"

    def newest(pattern: str) -> int:
        return max((int(p.name.rsplit("_", 1)[1]) for p in checkpoints.glob(pattern)), default=0)

    deadline = time.time() + 120  # saves run one at a time: a save newer than a complete one is in flight
    while time.time() < deadline and not 0 < newest("step_*") < newest(".tmp_step_*"):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.005)
    assert 0 < newest("step_*") < newest(".tmp_step_*"), sorted(p.name for p in checkpoints.iterdir())
    proc.kill()  # in-process run: the one rank dies, its writer thread with it
    proc.communicate()
    verify = run_chimera_here("checkpoint", "verify", tmp_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr  # every complete checkpoint is valid
    resumed = run_chimera("train", TINY, "--run-dir", tmp_path, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = tmp_path.parent / f"{tmp_path.name}-reference"
    assert run_chimera("train", TINY, "--run-dir", reference, *args).returncode == 0
    assert_same_losses(read_metrics(tmp_path), read_metrics(reference))


def test_a_hung_step_dumps_every_ranks_stack_before_the_collectives_give_up(tmp_path):
    proc = run_chimera("train", TINY, "--run-dir", tmp_path, "--nproc", 2, "--set", "train.micro_batch_size=2",
                       "--set", "train.steps=4", "--set", "parallel.timeout=4", "--max-restarts", 0,
                       "--set", "train.fault_injection.stall_at=[3]", "--set", "train.fault_injection.stall_seconds=8",
                       "--set", "logging.progress=false")
    assert proc.returncode not in (0, 2, 75)  # the collectives timed out: a failure, no restart left
    assert "no restart left" in proc.stderr
    stalled = (tmp_path / "stacks/rank_00000.txt").read_text()
    waiting = (tmp_path / "stacks/rank_00001.txt").read_text()
    assert "Timeout" in stalled and "in train_step" in stalled  # rank 0: in the stalled step
    assert "Timeout" in waiting and "in train_batch" in waiting  # rank 1: inside the step, waiting on rank 0
    assert [e["event"] for e in events.read(tmp_path)] == ["failure"]


def test_per_rank_step_times_and_peak_memory_are_in_the_metrics(tmp_path):
    proc = run_chimera("train", TINY, "--run-dir", tmp_path, "--nproc", 2, "--set", "train.micro_batch_size=2",
                       "--set", "logging.rank_stats_every=2", "--set", "logging.progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path)
    assert [("step_s_max" in r) for r in rows] == [False, True, False, True]
    for r in rows[1::2]:
        assert 0 < r["step_s_min"] <= r["step_s_median"] <= r["step_s_max"] and r["slowest_rank"] in (0, 1)
        assert 0.1 < r["peak_memory_gib"] < 20 and r["peak_memory_rank"] in (0, 1)
        assert r["grad_norm"] > 0


def test_the_time_limit_margin_stops_and_saves_like_a_signal(tmp_path):
    """CHIMERA_DEADLINE is the job's end (the Slurm launcher sets it from squeue); with launch.save_before_end of 1 h
    a job ending in 30 min is past its margin: the run saves after its first step and exits 75."""
    proc = run_chimera("train", TINY, "--run-dir", tmp_path, "--set", "launch.save_before_end=1h",
                       "--set", "logging.progress=false", env={"CHIMERA_DEADLINE": str(time.time() + 1800)})
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "stopped after step 1 (the time limit)" in proc.stdout
    assert json.loads((tmp_path / "checkpoints/step_00000001/trainer_state.json").read_text())["step"] == 1


def test_checkpoint_list_and_verify_say_which_checkpoints_are_valid(tmp_path, one_rank_run):
    run_dir = tmp_path / "run"
    shutil.copytree(one_rank_run / "run", run_dir)
    said = corrupt(run_dir, "flipped bytes")
    listing = run_chimera_here("checkpoint", "list", run_dir)
    assert listing.returncode == 0, listing.stderr
    rows = listing.stdout.strip().splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["2", "4", "6"]
    assert rows[0].endswith("yes") and rows[1].endswith("yes") and "T1 P1 C1 E1 D1 ZeRO0" in rows[0]
    assert "no: file tensors/rank_00000.zarr" in rows[2] and said in rows[2] and rows[2].endswith("(latest)")
    verify = run_chimera_here("checkpoint", "verify", run_dir)
    assert verify.returncode == 2 and "1 of 3 checkpoint(s)" in verify.stderr
    assert verify.stdout.count(": valid") == 2 and "step_00000006: INVALID" in verify.stdout
