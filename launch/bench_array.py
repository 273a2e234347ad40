"""``chimera bench-arch EXPERIMENT --slurm``: an architecture benchmark as one Slurm job array.

Every unfinished run of the experiment becomes one task of the array (``BenchRunTask``, one process). It is the
cluster launcher's task (``chimera.launch.slurm.SlurmTask``) with other work. A stop signal or the time limit makes
it save, requeue itself and resume. A failure requeues it up to ``launch.max_restarts`` times. After training, it
evaluates and writes the run's record, exactly as a local run does.

One more job (``BenchCollectTask``) waits until every task of the array has ended (``--dependency=afterany``).
Then it writes ``results.json`` and the plots, or fails naming the first run that did not finish. Running the
command again submits only the unfinished runs.

At submission, the experiment file is copied to ``OUT/slurm/experiment.yaml``. The tasks read that copy, so editing
the file after submitting does not change runs under way. Each run's resolved config is written to
``RUN_DIR/slurm/config.yaml``. Logs go to ``OUT/slurm/<job>/``. ``chimera launch status OUT`` and
``chimera launch cancel OUT`` work on these jobs as on any launch.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from chimera.configs.schema import LaunchConfig, RunConfig
from chimera.errors import UserError
from chimera.evaluation.bench import Plan, collect, plan, run_one
from chimera.evaluation.experiment import run_config
from chimera.launch import slurm

EXPERIMENT_COPY = "experiment.yaml"


@dataclass
class BenchRunTask(slurm.SlurmTask):
    """One run of the experiment on a node: train (stops and failures as any launched run), evaluate, record."""

    experiment: str = ""
    out: str = ""
    full_budget: bool = False
    key: str = ""

    def work(self, cfg: RunConfig) -> dict:
        p = plan(self.experiment, self.out, self.full_budget)
        return run_one(p, p.spec(self.key), cfg)


@dataclass
class BenchCollectTask:
    """After the array: ``results.json`` and the plots, or exit 2 naming the first unfinished run."""

    experiment: str
    out: str
    full_budget: bool

    def __call__(self) -> int:
        try:
            return collect(plan(self.experiment, self.out, self.full_budget))
        except UserError as e:
            print(f"chimera: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None


def launch_config(flags: dict) -> LaunchConfig:
    """The array tasks' launch section: one process per run (one node, one task)."""
    from chimera.configs.loader import validated

    launch = validated(LaunchConfig, {**flags, "nodes": 1, "tasks_per_node": 1}, prefix="launch.")
    if launch.gpus_per_node > 1:
        raise UserError(f"--gpus-per-node {launch.gpus_per_node}: a bench-arch run is one process; use 0 or 1")
    return launch


def pending(p: Plan) -> list:
    return [s for s in p.specs if not p.done(s)]


def refuse_while_queued(p: Plan) -> None:
    """An earlier submission whose jobs are still queued or running would train the same run directories twice."""
    record = p.out_dir / slurm.SLURM_DIR / slurm.LAUNCH_FILE
    if not record.is_file():
        return
    for job in slurm.launched(str(p.out_dir))["jobs"]:
        state = slurm.job_state(job)
        if slurm.is_active(state):
            raise UserError(f"job {job} of an earlier submission to {p.out_dir} is {state}: wait for it to end, or "
                            f"`chimera launch cancel {p.out_dir}`, then submit again")


def dry_run(p: Plan, launch: LaunchConfig) -> str:
    """What would be submitted: the array's sbatch script and its runs (nothing written, nothing submitted)."""
    runs = pending(p)
    lines = [f"# sbatch script of the job array ({len(runs)} runs; submitted through submitit; then one job that "
             f"writes results.json after them)", slurm.sbatch_script(p.out_dir, launch, len(runs)), "# runs"]
    lines += [f"{spec.key} -> {p.run_dir(spec)}" for spec in runs]
    return "\n".join(lines)


def submit_experiment(p: Plan, launch: LaunchConfig) -> list[str]:
    """Submit the unfinished runs as a job array and the collecting job after it; returns their job ids (the
    collecting job's last), recorded in ``OUT/slurm/launch.json``."""
    refuse_while_queued(p)
    runs = pending(p)
    ex = slurm.executor(p.out_dir, launch)
    experiment = p.out_dir / slurm.SLURM_DIR / EXPERIMENT_COPY
    if not experiment.exists() or not experiment.samefile(p.experiment_file):
        shutil.copyfile(p.experiment_file, experiment)
    tasks = []
    for spec in runs:
        where = p.run_dir(spec)
        cfg = run_config(spec, p.experiment).model_copy(update={"launch": launch})
        tasks.append(BenchRunTask(str(where), slurm.write_task_config(where, cfg), experiment=str(experiment),
                                  out=str(p.out_dir), full_budget=p.full_budget, key=spec.key))
    jobs = slurm.submitted(lambda: slurm.submit_array(ex, tasks))
    after = sorted({job.job_id.split("_")[0] for job in jobs})  # the array's id (every task of it)
    ex.update_parameters(dependency="afterany:" + ":".join(after))
    collector = BenchCollectTask(str(experiment), str(p.out_dir), p.full_budget)
    final = slurm.submitted(lambda: [ex.submit(collector)])[0]
    ids = [job.job_id for job in jobs] + [final.job_id]
    slurm.record_launch(p.out_dir, ids, [p.run_dir(spec) for spec in runs] + [Path(p.out_dir)])
    return ids
