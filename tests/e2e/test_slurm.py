"""`chimera launch slurm` against a real Slurm (a single-node cluster this module starts, tests/slurm_cluster.py):
a 2-task run equals the same run launched locally; a job preempted with a signal saves, requeues itself and finishes
with the uninterrupted run's losses and samples; a sweep is a job array; `--dry-run` submits and writes nothing;
`status` and `cancel`; and the launcher's bad inputs each give one line, exit 2."""

import json
import time

import pytest
from slurm_cluster import SlurmCluster, ensure_installed, job_state, wait_for_job

from chimera.trainer import events
from helpers import REPO, read_metrics, run_chimera

TINY = REPO / "configs/runs/tiny.yaml"
RUN = ["--set", "train.micro_batch_size=2", "--set", "logging.progress=false", "--set", "data.log_samples=true"]
JOB = [*RUN, "--set", "train.steps=12"]  # the run each job is held to (``local_run``)


@pytest.fixture(scope="module")
def cluster():
    ensure_installed()
    with SlurmCluster(cpus=4) as c:
        yield c


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The jobs' run launched locally, uninterrupted: the reference of each job (how often it saves changes no loss
    and no sample)."""
    run_dir = tmp_path_factory.mktemp("local")
    local(run_dir, *JOB)
    return run_dir


def launch(cluster, run_dir, *args):
    return run_chimera("launch", "slurm", TINY, "--run-dir", run_dir, "--tasks-per-node", 2, "--partition",
                       cluster.partition, "--time", "00:15:00", *args, env=cluster.env)


def job_of(run_dir) -> str:
    return json.loads((run_dir / "slurm/launch.json").read_text())["jobs"][0]


def local(run_dir, *args):
    proc = run_chimera("train", TINY, "--run-dir", run_dir, "--nproc", 2, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(run_dir)


def logs(run_dir) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "slurm").rglob("*_log.*")))


def assert_same_run(got_dir, expected_dir):
    got, expected = read_metrics(got_dir), read_metrics(expected_dir)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]
    samples = [(got_dir / "samples.jsonl").read_text(), (expected_dir / "samples.jsonl").read_text()]
    assert samples[0] == samples[1]  # no sample lost or repeated


def test_a_two_task_job_equals_the_local_run(tmp_path, cluster, local_run):
    proc = launch(cluster, tmp_path / "slurm", *JOB)
    assert proc.returncode == 0, proc.stderr
    job = job_of(tmp_path / "slurm")
    assert wait_for_job(cluster, job, timeout=600) == "COMPLETED", logs(tmp_path / "slurm")
    assert_same_run(tmp_path / "slurm", local_run)
    status = run_chimera("launch", "status", tmp_path / "slurm", env=cluster.env)
    assert status.returncode == 0 and f"job {job}: COMPLETED" in status.stdout and '"step": 12' in status.stdout
    assert sorted(p.name for p in (tmp_path / "slurm/slurm" / job).glob("*_log.out")) == \
        [f"{job}_0_log.out", f"{job}_1_log.out"]  # a log per rank under the run directory


def test_a_preempted_job_saves_requeues_and_finishes_exactly(tmp_path, cluster, local_run):
    args = [*JOB, "--set", "checkpoint.every=0"]
    assert launch(cluster, tmp_path / "slurm", *args).returncode == 0
    job, run_dir = job_of(tmp_path / "slurm"), tmp_path / "slurm"
    deadline = time.time() + 300
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists()
                                          and len(read_metrics(run_dir)) >= 3):
        assert job_state(cluster, job) in ("PENDING", "RUNNING"), logs(run_dir)
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR2", job, check=True)  # what a preemption sends to the tasks
    assert wait_for_job(cluster, job, timeout=600) == "COMPLETED", logs(run_dir)
    kinds = [e["event"] for e in events.read(run_dir)]
    assert kinds[:3] == ["stop", "requeue", "resume"], kinds
    stop = events.read(run_dir)[0]
    assert stop["reason"] == "SIGUSR2" and 3 <= stop["step"] < 12
    assert_same_run(run_dir, local_run)


def test_a_sweep_is_a_job_array_with_a_run_directory_per_point(tmp_path, cluster):
    proc = launch(cluster, tmp_path / "sweep", *RUN, "--sweep", "train.lr=1e-3,3e-3")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "sweep/slurm/launch.json").read_text())
    assert len(record["jobs"]) == 2 and all("_" in j for j in record["jobs"])  # one array, two tasks
    for job, lr in zip(record["jobs"], ("1e-3", "3e-3")):
        run_dir = tmp_path / f"sweep/train.lr={lr}"
        assert wait_for_job(cluster, job, timeout=600) == "COMPLETED", logs(tmp_path / "sweep")
        assert read_metrics(run_dir)[1]["lr"] == pytest.approx(float(lr))  # step 2: the end of warmup
    assert read_metrics(tmp_path / "sweep/train.lr=1e-3")[0]["loss"] == pytest.approx(
        read_metrics(tmp_path / "sweep/train.lr=3e-3")[0]["loss"], rel=1e-6)  # same start, different rates


def test_dry_run_prints_the_script_and_config_and_submits_nothing(tmp_path, cluster):
    before = cluster.run("squeue", "-h", "-o", "%i").stdout
    proc = launch(cluster, tmp_path / "dry", *RUN, "--nodes", 1, "--setup", "module load cuda", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --requeue", "#SBATCH --signal=USR2@300",
                 f"#SBATCH --partition={cluster.partition}", "#SBATCH --time=15", "module load cuda", "srun",
                 "# resolved config", "micro_batch_size: 2"):
        assert line in proc.stdout, line
    assert not (tmp_path / "dry").exists()
    assert cluster.run("squeue", "-h", "-o", "%i").stdout == before


def test_cancel(tmp_path, cluster):
    assert launch(cluster, tmp_path / "c", *RUN, "--set", "train.steps=100000").returncode == 0
    job = job_of(tmp_path / "c")
    proc = run_chimera("launch", "cancel", tmp_path / "c", env=cluster.env)
    assert proc.returncode == 0 and job in proc.stdout
    assert wait_for_job(cluster, job, timeout=120) == "CANCELLED"


@pytest.mark.parametrize("args, text", [
    (["--set", "parallel.tensor=4"], "world size 2 does not factor"),
    (["--set", "launch.partiton=debug"], "launch.partiton: unknown field"),
    (["--time", "soon"], "is not a duration"),
    (["--sweep", "train.lr"], "is not of the form a.b=v1,v2"),
])
def test_bad_launches_are_one_line_and_exit_2(tmp_path, cluster, args, text):
    proc = launch(cluster, tmp_path / "bad", *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and text in lines[0], proc.stderr
    assert not (tmp_path / "bad").exists()


def test_a_run_directory_of_another_model_is_refused_before_submitting(tmp_path, cluster):
    proc = run_chimera("train", TINY, "--run-dir", tmp_path / "x", "--set", "train.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = cluster.run("squeue", "-h", "-o", "%i").stdout
    proc = launch(cluster, tmp_path / "x", *RUN, "--set", "model.preset=llama-tiny")
    assert proc.returncode == 2 and "was written with another model." in proc.stderr
    assert cluster.run("squeue", "-h", "-o", "%i").stdout == before


def test_status_of_a_directory_without_a_job(tmp_path, cluster):
    proc = run_chimera("launch", "status", tmp_path, env=cluster.env)
    assert proc.returncode == 2 and "has no job launched" in proc.stderr


def test_a_killed_task_requeues_the_job_which_finishes_exactly(tmp_path, cluster, local_run):
    args = [*JOB, "--set", "checkpoint.every=2"]
    assert launch(cluster, tmp_path / "slurm", *args).returncode == 0
    job, run_dir = job_of(tmp_path / "slurm"), tmp_path / "slurm"
    deadline = time.time() + 300
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 3):
        assert job_state(cluster, job) in ("PENDING", "RUNNING"), logs(run_dir)
        time.sleep(0.2)
    victim = next(pid for pid in cluster.run("pgrep", "-f", "submitit.core._submit").stdout.split()
                  if "SLURM_PROCID=1" in open(f"/proc/{pid}/environ").read().split("\0"))
    cluster.run("kill", "-9", victim, check=True)
    assert wait_for_job(cluster, job, timeout=600) == "COMPLETED", logs(run_dir)
    failures = [e for e in events.read(run_dir) if e["event"] == "failure"]
    assert len(failures) == 1 and failures[0]["restarting"] and failures[0]["job"] == job
    assert_same_run(run_dir, local_run)


def test_bench_arch_as_a_job_array_equals_the_local_benchmark(tmp_path, cluster):
    """``bench-arch --slurm``: a task per run and a job that collects them; the results equal the same experiment
    run locally; a second submission while the first is queued is refused; a rerun once done submits nothing."""
    from chimera.evaluation.bench import validate_results
    from helpers import TINY_EXPERIMENT

    exp = tmp_path / "tiny.yaml"
    exp.write_text(TINY_EXPERIMENT)
    proc = run_chimera("bench-arch", exp, "--out", tmp_path / "local")
    assert proc.returncode == 0, proc.stderr[-3000:]
    submit = ["bench-arch", exp, "--out", tmp_path / "slurm", "--slurm", "--partition", cluster.partition,
              "--time", "00:15:00"]
    proc = run_chimera(*submit, env=cluster.env)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "slurm/slurm/launch.json").read_text())
    *array, collector = record["jobs"]
    assert len(array) == 2 and len({j.split("_")[0] for j in array}) == 1 and "_" not in collector
    again = run_chimera(*submit, env=cluster.env)  # the first submission's jobs are queued or running
    assert again.returncode == 2 and "of an earlier submission" in again.stderr, again.stderr
    assert wait_for_job(cluster, collector, timeout=600) == "COMPLETED", logs(tmp_path / "slurm")
    assert all(job_state(cluster, job) == "COMPLETED" for job in array)

    got, want = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("slurm", "local"))
    validate_results(got)
    assert got["experiment_file"].endswith("slurm/experiment.yaml")  # the copy the tasks read
    for a, b in zip(got["runs"], want["runs"], strict=True):
        assert (a["key"], a["parameters"], a["steps"]) == (b["key"], b["parameters"], b["steps"])
        assert [s for s, _ in a["loss_curve"]] == [s for s, _ in b["loss_curve"]]
        assert [v for _, v in a["loss_curve"]] == pytest.approx([v for _, v in b["loss_curve"]], rel=1e-5)
        assert a["eval"]["mqar"]["summary"] == pytest.approx(b["eval"]["mqar"]["summary"], rel=1e-5)
        assert [r["loss"] for r in a["longctx"]] == pytest.approx([r["loss"] for r in b["longctx"]], rel=1e-5)
    assert (tmp_path / "slurm/plots/accuracy_vs_length.png").is_file()
    status = run_chimera("launch", "status", tmp_path / "slurm", env=cluster.env)
    assert status.returncode == 0 and status.stdout.count("COMPLETED") == 3, status.stdout

    before = cluster.run("squeue", "-h", "-o", "%i").stdout
    rerun = run_chimera(*submit, env=cluster.env)
    assert rerun.returncode == 0 and "nothing submitted" in rerun.stdout, rerun.stderr
    assert cluster.run("squeue", "-h", "-o", "%i").stdout == before
