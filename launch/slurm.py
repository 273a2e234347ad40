"""Running on a Slurm cluster, through submitit: ``chimera launch slurm | status | cancel``.

``submit`` checks everything a job would trip on before anything is submitted (the config, the world size of
``nodes x tasks per node`` against the layout, a run directory that belongs to another run), writes the resolved
config to ``RUN_DIR/slurm/config.yaml`` (what every restart of the job reads, so it does not change under it), and
submits one job of ``nodes x tasks_per_node`` tasks (one per GPU, or per CPU rank), or, with sweep points, a job
array with one run directory per point (``RUN_DIR/<field>=<value>...``). submitit writes the sbatch script and
each task's log to ``RUN_DIR/slurm/`` (``<job>_<task>_log.out``/``.err``); ``RUN_DIR/slurm/launch.json`` records
the job ids for ``status`` and ``cancel``.

Each task (``SlurmTask``, run by submitit on the nodes) takes its rendezvous from Slurm's own variables:
``SLURM_PROCID`` -> rank, ``SLURM_LOCALID`` -> local rank, ``SLURM_NTASKS`` -> world size, the first host of
``SLURM_JOB_NODELIST`` -> master address, and a port derived from the job id and its restart count (so a requeued
job never meets its previous incarnation's port). Then it trains (``chimera.trainer.loop.train``), and:

* **stopped** by a preemption signal (``launch.stop_signals``, default USR2 and TERM, every rank) or by the time
  limit (USR2 ``launch.save_before_end`` ahead through ``--signal``, and ``CHIMERA_DEADLINE`` checked by rank 0
  at each step): every rank saved after the same step; rank 0 requeues the job (``scontrol requeue``), which
  restarts it, resuming from that checkpoint;
* **a rank died** (a collective failed, or timed out after ``parallel.timeout``): the first survivor to claim the
  restart requeues the job, up to ``launch.max_restarts`` times (counted in ``RUN_DIR/events.jsonl``), each with
  its cause; then the job fails.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from chimera.configs.schema import LaunchConfig, RunConfig, parse_duration
from chimera.errors import UserError

SLURM_DIR = "slurm"
LAUNCH_FILE = "launch.json"
CONFIG_FILE = "config.yaml"


# ---- Slurm's variables ------------------------------------------------------------------------------------


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compact host list, e.g. ``gpu[01-03,07],cpu5`` -> ``gpu01 gpu02 gpu03 gpu07 cpu5`` (``scontrol show
    hostnames`` without a round trip to the controller)."""
    hosts, depth, part = [], 0, ""
    for char in nodelist + ",":
        if char == "," and depth == 0:
            if part:
                hosts += _expand_one(part)
            part = ""
            continue
        depth += {"[": 1, "]": -1}.get(char, 0)
        part += char
    return hosts


def _expand_one(name: str) -> list[str]:
    pieces = re.split(r"(\[[^\]]*\])", name)
    choices = []
    for piece in pieces:
        if not piece.startswith("["):
            choices.append([piece])
            continue
        values = []
        for item in piece[1:-1].split(","):
            lo, _, hi = item.partition("-")
            values += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi or lo) + 1)]
        choices.append(values)
    return ["".join(parts) for parts in itertools.product(*choices)]


# The rendezvous port of a job: every task computes the same one from the job id and restart count, with no
# exchange. The ports lie below Linux's default ephemeral range (32768-60999): an outbound connection on the node
# (another job's gloo or NCCL sockets, say) is given a port from that range and can hold any port in it, and a
# store listening on such a port fails with EADDRINUSE. Each restart moves to another port.
RENDEZVOUS_PORTS = range(12000, 32768)


def rendezvous_port(job: int, restart: int) -> int:
    span = len(RENDEZVOUS_PORTS)
    return RENDEZVOUS_PORTS.start + (job * 7919 + restart * 104729) % span


def rendezvous(env=os.environ) -> dict[str, str]:
    """The torch.distributed environment of this task, from Slurm's variables."""
    job = int(env["SLURM_JOB_ID"])
    restart = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    ntasks = int(env["SLURM_NTASKS"])
    nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    return {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env["SLURM_LOCALID"], "WORLD_SIZE": str(ntasks),
            "LOCAL_WORLD_SIZE": str(ntasks // max(nodes, 1)),
            "MASTER_ADDR": expand_nodelist(env["SLURM_JOB_NODELIST"])[0],
            "MASTER_PORT": str(rendezvous_port(job, restart))}


def job_end(job_id: str) -> float | None:
    """The job's end time (seconds since the epoch), from ``squeue``; None if it cannot be told."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
        return time.mktime(time.strptime(out, "%Y-%m-%dT%H:%M:%S"))
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def requeue(job_id: str) -> bool:
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    return done.returncode == 0


# ---- the task ---------------------------------------------------------------------------------------------


@dataclass
class SlurmTask:
    """What each task of the job runs (submitit pickles it and calls it on the nodes, again after each requeue)."""

    run_dir: str
    config: str  # the resolved run config, written at submission

    def __call__(self) -> dict:
        from chimera.configs.loader import load_run_config
        from chimera.trainer import events, stopping

        os.environ.update(rendezvous())
        rank, job = int(os.environ["RANK"]), os.environ["SLURM_JOB_ID"]
        cfg = load_run_config(self.config)
        stopping.install(cfg.launch.stop_signals)
        if rank == 0:
            end = job_end(job)
            if end is not None:
                os.environ[stopping.DEADLINE_ENV] = str(end)
        try:
            result = self.work(cfg)
        except UserError as e:
            if rank == 0:
                print(f"chimera: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except Exception as e:
            self._after_failure(cfg, job, rank, f"rank {rank}: {type(e).__name__}: {str(e)[:300]}")
            raise
        if result["stopped"] and rank == 0:
            events.record(self.run_dir, "requeue", job=job, reason=result["stopped"])
            print(f"chimera: job {job} requeued after step {result['step']} ({result['stopped']})", flush=True)
            requeue(job)
        return {"step": result["step"], "stopped": result["stopped"]}

    def work(self, cfg: RunConfig) -> dict:
        """What the task runs: training, to the end or to a stop (``train()``'s result: ``step``, ``stopped``)."""
        from chimera.trainer.loop import train

        return train(cfg, self.run_dir, announce=True)

    def checkpoint(self, *args, **kwargs):
        """submitit's own USR2 handler calls this when the signal comes before the trainer's handler is installed
        (while the task starts): nothing is trained yet, the job is simply requeued as it is."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)

    def _after_failure(self, cfg: RunConfig, job: str, rank: int, cause: str) -> None:
        """A surviving rank: the first to claim this attempt requeues the job if restarts are left."""
        from chimera.trainer import events

        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        claim = Path(self.run_dir) / SLURM_DIR / f".failure-{job}-{restart}"
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another survivor handles it
        done = sum(1 for e in events.read(self.run_dir) if e["event"] == "failure" and e.get("restarting"))
        again = done < cfg.launch.max_restarts
        events.record(self.run_dir, "failure", attempt=done + 1, cause=cause, job=job, restarting=again)
        if again:
            print(f"chimera: {cause}; requeueing job {job} (restart {done + 1} of {cfg.launch.max_restarts})",
                  file=sys.stderr, flush=True)
            requeue(job)


# ---- submitting -------------------------------------------------------------------------------------------


@dataclass
class Submission:
    run_dir: Path
    launch: LaunchConfig
    points: list[tuple[Path, RunConfig]] = field(default_factory=list)  # (run directory, config) per job (task)


def sweep_points(sweeps: list[str]) -> list[list[str]]:
    """``["train.lr=1e-3,3e-3", "train.seed=1,2"]`` -> every combination, as ``--set`` items."""
    axes = []
    for item in sweeps:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UserError(f"--sweep {item!r} is not of the form a.b=v1,v2,...")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def point_name(items: list[str]) -> str:
    return ",".join(items).replace("/", "_") or "run"


def time_minutes(text: str) -> int:
    return max(1, math.ceil(parse_duration(text, "launch.time") / 60))


def prepare(config: str, overrides: list[str], run_dir: str, launch_flags: dict, sweeps: list[str],
            dry_run: bool = False) -> Submission:
    """Everything checked before a job is submitted; the run directories and configs of the job(s)."""
    from chimera.configs.loader import load_run_config, validated
    from chimera.configs.schema import validate_layout
    from chimera.trainer.checkpoint import latest_checkpoint, read_config
    from chimera.trainer.resumption import check_writable, compare, has_run, refusal

    base = load_run_config(config, overrides)
    launch = validated(LaunchConfig, {**base.launch.model_dump(), **launch_flags}, prefix="launch.")
    world = launch.nodes * launch.ranks_per_node
    points = []
    for items in sweep_points(sweeps):
        cfg = load_run_config(config, [*overrides, *items]).model_copy(update={"launch": launch})
        validate_layout(cfg, world)
        where = Path(run_dir) if not sweeps else Path(run_dir) / point_name(items)
        if has_run(where):  # a run directory that belongs to another run is refused before submitting
            ckpt = latest_checkpoint(where)
            if ckpt is not None:
                changes = compare(read_config(ckpt), json.loads((ckpt / "trainer_state.json").read_text()), cfg)
                if changes.refused:
                    raise refusal(ckpt, changes)
        points.append((where, cfg))
    if not dry_run:  # a dry run writes nothing, not even the run directory
        check_writable(run_dir)
    elif Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise UserError(f"--run-dir {run_dir!r} exists and is not a directory")
    return Submission(Path(run_dir), launch, points)


def sbatch_parameters(launch: LaunchConfig, name: str) -> dict:
    """submitit's SlurmExecutor parameters of a launch section."""
    params = {"job_name": name, "nodes": launch.nodes, "ntasks_per_node": launch.ranks_per_node,
              "time": time_minutes(launch.time), "signal_delay_s": int(parse_duration(launch.save_before_end)),
              "setup": list(launch.setup) or None, "partition": launch.partition, "account": launch.account,
              "qos": launch.qos, "constraint": launch.constraint, "mem": launch.mem,
              "exclusive": launch.exclusive or None, "cpus_per_task": launch.cpus_per_task,
              "gpus_per_node": launch.gpus_per_node or None, "additional_parameters": {"requeue": True}}
    return {k: v for k, v in params.items() if v is not None}


def sbatch_script(run_dir: Path, launch: LaunchConfig, tasks: int) -> str:
    """The script sbatch would get for ``tasks`` jobs (more than one: an array) whose logs go under
    ``RUN_DIR/slurm/`` (what ``--dry-run`` prints; nothing is written)."""
    from submitit.slurm.slurm import _make_sbatch_string  # the script submitit submits (submitit pinned)

    folder = run_dir / SLURM_DIR / "%j"
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    params = sbatch_parameters(launch, f"chimera-{run_dir.name}")
    if tasks > 1:
        params["map_count"] = tasks
    return _make_sbatch_string(command=command, folder=folder, **params)


def executor(run_dir: Path, launch: LaunchConfig):
    """A submitit executor whose jobs log under ``RUN_DIR/slurm/<job>/`` (made here), with ``launch``'s sbatch
    parameters; refused in one line where Slurm's commands are missing."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise UserError("sbatch/srun not found: run this where Slurm's commands are (a login node)")
    import submitit

    folder = run_dir / SLURM_DIR
    folder.mkdir(parents=True, exist_ok=True)
    ex = submitit.SlurmExecutor(folder=folder / "%j", python=shlex.quote(sys.executable),
                                max_num_timeout=1_000_000)  # requeues are ours: never a submitit timeout
    ex.update_parameters(**sbatch_parameters(launch, f"chimera-{run_dir.name}"))
    return ex


def submitted(submit_jobs) -> list:
    """The jobs ``submit_jobs()`` returns; sbatch's refusal (a bad partition, account, limit) as one line."""
    try:
        return submit_jobs()
    except Exception as e:
        message = str(e).strip().splitlines()
        raise UserError(f"sbatch refused the job: {message[-1] if message else e}") from None


def record_launch(run_dir: Path, ids: list[str], run_dirs: list) -> None:
    """``RUN_DIR/slurm/launch.json``: the job ids and the run directory of each, for ``status`` and ``cancel``."""
    folder = run_dir / SLURM_DIR
    record = {"jobs": ids, "run_dirs": [str(where) for where in run_dirs], "folder": str(folder),
              "submitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (folder / LAUNCH_FILE).write_text(json.dumps(record, indent=1))


def write_task_config(where: Path, cfg: RunConfig) -> str:
    """The resolved config a task reads at every (re)start, ``WHERE/slurm/config.yaml``; its path."""
    config = where / SLURM_DIR / CONFIG_FILE
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))
    return str(config)


def submit(submission: Submission) -> list[str]:
    """Submit the job (or job array); returns the job ids, recorded in ``RUN_DIR/slurm/launch.json``."""
    ex = executor(submission.run_dir, submission.launch)
    tasks = []
    for where, cfg in submission.points:
        where.mkdir(parents=True, exist_ok=True)
        tasks.append(SlurmTask(str(where), write_task_config(where, cfg)))
    ids = [job.job_id for job in submitted(lambda: submit_array(ex, tasks))]
    record_launch(submission.run_dir, ids, [where for where, _ in submission.points])
    return ids


def submit_array(ex, tasks: list) -> list:
    """One job for one task, else one job array of a task each."""
    if len(tasks) == 1:
        return [ex.submit(tasks[0])]
    with ex.batch():
        return [ex.submit(task) for task in tasks]


# ---- status and cancel ------------------------------------------------------------------------------------


def launched(run_dir: str) -> dict:
    path = Path(run_dir) / SLURM_DIR / LAUNCH_FILE
    if not path.is_file():
        raise UserError(f"{run_dir!r} has no job launched by `chimera launch slurm` (no {SLURM_DIR}/{LAUNCH_FILE})")
    return json.loads(path.read_text())


# Job states from which a job does not move on by itself (Slurm's squeue(1) "JOB STATE CODES").
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT")


def is_active(state: str) -> bool:
    """Whether a job in ``state`` (as ``job_state`` reads it) is still queued, running or about to run again."""
    return not state.startswith("UNKNOWN") and state.split()[0] not in TERMINAL_STATES


def job_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.split()
    if out:
        return out[0]
    info = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    found = re.search(r"JobState=(\S+)", info)
    return found.group(1) if found else "UNKNOWN (no longer known to Slurm; see the logs)"


def last_metrics(run_dir: str) -> str:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return "no metrics yet"
    lines = path.read_text().splitlines()
    return lines[-1] if lines else "no metrics yet"


def status(run_dir: str) -> list[str]:
    record = launched(run_dir)
    lines = []
    for job, where in zip(record["jobs"], record["run_dirs"]):
        lines.append(f"job {job}: {job_state(job)}; {where}: {last_metrics(where)}")
    return lines


def cancel(run_dir: str) -> list[str]:
    record = launched(run_dir)
    ids = sorted({job.split("_")[0] for job in record["jobs"]})
    done = subprocess.run(["scancel", *ids], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"scancel {' '.join(ids)} failed: {done.stderr.strip()}")
    return ids
