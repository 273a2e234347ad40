"""A real, throw-away, single-node Slurm cluster for tests.

Tests of the Slurm launcher run against real Slurm (22.05 from Debian's apt), not a mock:

    from slurm_cluster import SlurmCluster, ensure_installed, submit, wait_for_job

    ensure_installed()
    with SlurmCluster(cpus=4) as cluster:
        job = submit(cluster, "--ntasks=2", "--output", f"{cluster.tmp}/out-%j.txt", "--wrap", "srun hostname")
        assert wait_for_job(cluster, job) == "COMPLETED"

How it is set up (see also /work/shared/SLURM.md, measured on these machines):

- Everything runs as root; no systemd, no cgroups. ``ensure_installed()`` installs the Debian packages
  (slurmctld, slurmd, slurm-client, munge) when the binaries are missing.
- munge: the one system munged, on its standard socket /run/munge/munge.socket.2, running as the munge
  user. If one already answers it is reused and left running; otherwise the cluster starts one (creating
  the key if missing) and stops it again in ``stop()`` unless another live cluster still uses it.
- Each cluster lives in a fresh temp directory ``chimera-slurm-XXXX`` holding slurm.conf, the controller's
  state, slurmd's spool, the logs (``log/``) and the pid files. ``stop()`` removes it (``keep_tmp=True``
  keeps it); a failed ``start()`` keeps it and puts the tails of the logs in its error. slurmctld and
  slurmd run in the foreground (``-D``) as children of the test process, pointed at that slurm.conf by
  ``-f`` and by SLURM_CONF; their ports are picked free at start, so a cluster never collides with a
  leftover one. Job ids restart at 1 in every new cluster: use a fresh output folder per cluster.
- The one node is ``hostname -s`` (added to /etc/hosts as 127.0.0.1 if it does not resolve) and declares
  ``cpus`` CPUs whatever the hardware has (SlurmdParameters=config_overrides). Processes are tracked by
  proctrack/linuxproc; there is no accounting daemon, so no ``sacct``: job states come from
  ``scontrol show job``, and MinJobAge=3600 keeps finished jobs visible there.
- Requeue is fast: AuthInfo=cred_expire=10 and sched_interval=2 bring a requeue-to-restart to ~11 s
  instead of ~2 min. The job waits as PENDING (Reason=BeginTime) in between; ``scontrol show job`` counts
  ``Restarts=N`` and the job sees SLURM_RESTART_COUNT=N. The restarted run truncates the --output file
  (sbatch --open-mode=append keeps the first run's output).
- Signals (measured): ``scancel --signal=SIG ID`` reaches job steps (srun) only, never the batch script;
  ``scancel --batch --signal=SIG`` reaches the batch shell only, ``--full`` every process of the job.
  ``sbatch --wrap`` runs its command under /bin/sh (dash): a bash trap in a script it starts is not the
  batch shell, and the sh dies of the signal; use ``--wrap "exec bash script"`` or a #!/bin/bash script.
- Every process that belongs to a cluster (daemons, slurmstepd, job processes) carries SLURM_CONF pointing
  into its temp directory: slurmd passes it down even with ``--export=NONE``. That is how ``stop()`` finds
  and kills what is left of jobs, and how ``start()`` kills a cluster left behind by a crashed test session
  (its owner process, recorded in the ``owner`` file, is gone).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from chimera.launch.slurm import TERMINAL_STATES

__all__ = [
    "TERMINAL_STATES",
    "SlurmCluster",
    "ensure_installed",
    "job_info",
    "job_state",
    "kill_stale_clusters",
    "submit",
    "wait_for_job",
]

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
REQUIRED_BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])

MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN_DIR = Path("/run/munge")

TMP_PREFIX = "chimera-slurm-"
# A slurm.conf of ours, wherever the temp root was when it was made.
_OUR_CONF = re.compile(rf"/{re.escape(TMP_PREFIX)}[^/]+/slurm\.conf$")


# Variables a test process may have inherited from an outer Slurm job; they would steer sbatch/srun.
_SLURM_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCANCEL_")

_LIVE: list[SlurmCluster] = []  # clusters started and not yet stopped by this process


# --------------------------------------------------------------------------------------------- install


def _which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def ensure_installed() -> None:
    """Install Slurm and munge from apt unless their binaries are already there (then this is instant)."""
    if all(_which(b) for b in REQUIRED_BINARIES):
        return
    if os.geteuid() != 0:
        missing = ", ".join(b for b in REQUIRED_BINARIES if not _which(b))
        raise RuntimeError(f"Slurm is not installed ({missing} missing) and installing it needs root")
    result = _apt_install()
    if result.returncode != 0 and _lacks_package_lists(result.stdout + result.stderr):
        update = _apt("update")
        if update.returncode != 0:
            raise RuntimeError(f"apt-get update failed: {_last_line(update.stderr or update.stdout)}")
        result = _apt_install()
    if result.returncode != 0:
        raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed: {_last_line(result.stderr or result.stdout)}")
    missing = [b for b in REQUIRED_BINARIES if not _which(b)]
    if missing:
        raise RuntimeError(f"apt-get installed {' '.join(PACKAGES)} but {', '.join(missing)} still missing")


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "-o", "DPkg::Lock::Timeout=120", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, check=False)


def _apt_install() -> subprocess.CompletedProcess[str]:
    return _apt("install", "-y", "--no-install-recommends", *PACKAGES)


def _lacks_package_lists(output: str) -> bool:
    signs = ("Unable to locate package", "has no installation candidate", "Failed to fetch", "404  Not Found")
    return any(sign in output for sign in signs)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


# --------------------------------------------------------------------------------------------- cluster


class SlurmCluster:
    """slurmctld + slurmd (+ munged if none runs) on this machine, with one node and one partition.

    ``cpus``: CPUs the node declares (may exceed the hardware). ``memory_mb``: the node's RealMemory
    (Slurm's default is 1 MB, so jobs asking ``--mem`` need this). ``settings``: slurm.conf keys that
    replace or add to the defaults below, e.g. ``{"KillWait": "5"}``. ``extra_lines``: lines appended to
    slurm.conf verbatim. ``start_timeout``: seconds to wait for the node to come up idle.

    After ``start()``: ``tmp`` (the cluster's directory), ``conf_path``, ``partition``, ``node``, and
    ``env``: a copy of os.environ without inherited SLURM_* variables plus SLURM_CONF, to pass as
    ``env=`` to subprocesses that run sbatch, srun, squeue, scontrol, scancel against this cluster.
    """

    def __init__(
        self,
        cpus: int = 4,
        *,
        memory_mb: int | None = None,
        partition: str = "debug",
        cluster_name: str = "chimera-test",
        settings: Mapping[str, str] | None = None,
        extra_lines: Iterable[str] = (),
        start_timeout: float = 30.0,
        keep_tmp: bool = False,
    ):
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.partition = partition
        self.cluster_name = cluster_name
        self.settings = dict(settings or {})
        self.extra_lines = list(extra_lines)
        self.start_timeout = start_timeout
        self.keep_tmp = keep_tmp
        self.node = ""
        self.tmp: Path | None = None
        self.conf_path: Path | None = None
        self.env: dict[str, str] = {}
        self._daemons: dict[str, subprocess.Popen] = {}
        self._munged: subprocess.Popen | None = None

    # ---- context manager

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ---- start

    def start(self) -> SlurmCluster:
        if self.tmp is not None:
            raise RuntimeError("this SlurmCluster is already started")
        if os.geteuid() != 0:
            raise RuntimeError("a SlurmCluster needs root (it starts munged, slurmctld and slurmd)")
        ensure_installed()
        kill_stale_clusters()

        self.node = _short_hostname()
        _ensure_resolvable(self.node)
        self.tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
        (self.tmp / "owner").write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
        for sub in ("state", "spool", "log"):
            (self.tmp / sub).mkdir()
        self.conf_path = self.tmp / "slurm.conf"
        self.conf_path.write_text(self._conf_text())
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(_SLURM_ENV_PREFIXES)}
        self.env["SLURM_CONF"] = str(self.conf_path)
        _LIVE.append(self)

        try:
            self._start_munge()
            self._spawn("slurmctld", "-D", "-f", str(self.conf_path))
            self._spawn("slurmd", "-D", "-f", str(self.conf_path), "-N", self.node)
            self._wait_until_idle()
        except BaseException:
            self.stop(keep_tmp=True)  # the logs are named in the error
            raise
        return self

    def _conf_text(self) -> str:
        tmp = self.tmp
        ctld_port, slurmd_port = _free_ports(2)
        settings = {
            "ClusterName": self.cluster_name,
            "SlurmctldHost": f"{self.node}(127.0.0.1)",
            "SlurmctldPort": str(ctld_port),
            "SlurmdPort": str(slurmd_port),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": "cred_expire=10",
            "StateSaveLocation": f"{tmp}/state",
            "SlurmdSpoolDir": f"{tmp}/spool",
            "SlurmctldLogFile": f"{tmp}/log/slurmctld.log",
            "SlurmdLogFile": f"{tmp}/log/slurmd.log",
            "SlurmctldPidFile": f"{tmp}/slurmctld.pid",
            "SlurmdPidFile": f"{tmp}/slurmd.pid",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            "SlurmdParameters": "config_overrides",
            "MpiDefault": "none",
            "ReturnToService": "2",
            "MailProg": "/bin/true",
            "SchedulerParameters": "sched_interval=2,bf_interval=2",
            "MinJobAge": "3600",
            "JobRequeue": "1",
        }
        settings.update(self.settings)
        node = f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN"
        if self.memory_mb is not None:
            node += f" RealMemory={self.memory_mb}"
        partition = f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP"
        lines = [f"{key}={value}" for key, value in settings.items()]
        return "\n".join(["# Written by tests/slurm_cluster.py", *lines, node, partition, *self.extra_lines, ""])

    def _start_munge(self) -> None:
        if _munge_answers():
            return  # a munged already runs (ours from before, or the system's): share it, leave it running
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(mode=0o700, exist_ok=True)
            _run_checked([_which("mungekey") or "mungekey", "--create", "--keyfile", str(MUNGE_KEY)])
        for path in (MUNGE_KEY.parent, MUNGE_KEY):
            shutil.chown(path, "munge", "munge")
        MUNGE_KEY.chmod(0o600)
        for directory in (MUNGE_RUN_DIR, Path("/var/lib/munge"), Path("/var/log/munge")):
            directory.mkdir(parents=True, exist_ok=True)
            shutil.chown(directory, "munge", "munge")
        MUNGE_RUN_DIR.chmod(0o755)
        with open(self.tmp / "log" / "munged.out", "wb") as log:
            self._munged = subprocess.Popen(
                [_which("munged") or "munged", "--foreground"],
                user="munge",
                group="munge",
                extra_groups=[],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while not _munge_answers():
            if self._munged.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not come up\n{self.log_tails()}")
            time.sleep(0.1)

    def _spawn(self, name: str, *args: str) -> None:
        with open(self.tmp / "log" / f"{name}.out", "wb") as log:
            self._daemons[name] = subprocess.Popen(
                [_which(name) or name, *args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # no SIGINT from the terminal; stop() ends them
            )

    def _wait_until_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        state = "(no answer)"
        while time.monotonic() < deadline:
            for name, process in self._daemons.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode} at start\n{self.log_tails()}")
            result = self.run("sinfo", "--noheader", "--Node", "--nodes", self.node, "--format=%T")
            if result.returncode == 0 and result.stdout.strip():
                state = result.stdout.strip()
                if state == "idle":
                    return
            time.sleep(0.1)
        raise RuntimeError(
            f"Slurm node {self.node} not idle after {self.start_timeout:.0f} s (last state: {state})\n"
            f"{self.log_tails()}"
        )

    # ---- use

    def run(self, *command: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command (sinfo, squeue, scontrol, scancel, sbatch, srun) against this cluster."""
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def log_tails(self, lines: int = 20) -> str:
        """The last lines of every daemon log of this cluster, for error messages."""
        if self.tmp is None or not (self.tmp / "log").is_dir():
            return "(no logs)"
        parts = [f"(logs of this cluster: {self.tmp / 'log'})"]
        for path in sorted((self.tmp / "log").iterdir()):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path} (last {len(text)} lines)\n" + "\n".join(text))
        munge_log = Path("/var/log/munge/munged.log")
        if self._munged is not None and munge_log.exists():
            text = munge_log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {munge_log} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(parts)

    # ---- stop

    def stop(self, keep_tmp: bool | None = None) -> None:
        """Kill the daemons this cluster started and every job process; remove its directory."""
        if self.tmp is None:
            return
        for name in ("slurmctld", "slurmd"):  # the controller first, so that it schedules nothing more
            process = self._daemons.pop(name, None)
            if process is not None:
                _terminate(process)
        _kill_processes_of({str(self.conf_path)})  # slurmstepd, job steps, stray srun
        if self._munged is not None and not _other_live_clusters(self.tmp):
            _terminate(self._munged)
        self._munged = None
        if self in _LIVE:
            _LIVE.remove(self)
        if not (self.keep_tmp if keep_tmp is None else keep_tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None


@atexit.register
def _stop_live_clusters() -> None:
    for cluster in list(_LIVE):
        cluster.stop()


def kill_stale_clusters() -> list[int]:
    """Kill the processes of clusters whose owner process is gone (a crashed session); return their pids."""
    stale_confs = set()
    for _pid, conf in _cluster_processes():
        if not _owner_alive(Path(conf).parent):
            stale_confs.add(conf)
    killed = _kill_processes_of(stale_confs) if stale_confs else []
    for conf in stale_confs:
        shutil.rmtree(Path(conf).parent, ignore_errors=True)
    return killed


# --------------------------------------------------------------------------------------------- jobs


def submit(cluster: SlurmCluster, *sbatch_args: str, cwd: str | os.PathLike | None = None) -> int:
    """``sbatch --parsable ARGS`` against ``cluster``; return the job id (raise with sbatch's error)."""
    result = subprocess.run(
        ["sbatch", "--parsable", *sbatch_args], env=cluster.env, cwd=cwd, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"sbatch {' '.join(sbatch_args)} failed: {result.stderr.strip()}")
    return int(result.stdout.strip().split(";")[0])


def job_info(cluster: SlurmCluster, job_id: int | str) -> dict[str, str] | None:
    """``scontrol show job ID`` as a dict (JobState, Reason, Restarts, ExitCode, StdOut, ...); None if unknown.

    Values that contain spaces (Command, WorkDir with spaces) are cut at the first space.
    """
    result = cluster.run("scontrol", "--oneliner", "show", "job", str(job_id))
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return None
        raise RuntimeError(f"scontrol show job {job_id} failed: {result.stderr.strip()}")
    first_line = result.stdout.strip().splitlines()[0]
    return dict(field.split("=", 1) for field in first_line.split() if "=" in field)


def job_state(cluster: SlurmCluster, job_id: int | str) -> str | None:
    """The job's JobState (PENDING, RUNNING, COMPLETING, COMPLETED, FAILED, ...); None if Slurm does not know it."""
    info = job_info(cluster, job_id)
    return None if info is None else info.get("JobState")


def wait_for_job(
    cluster: SlurmCluster,
    job_id: int | str,
    states: Iterable[str] = TERMINAL_STATES,
    timeout: float = 120.0,
    poll: float = 0.5,
) -> str:
    """Poll until the job's JobState is one of ``states`` or terminal; return that state.

    A terminal state ends the wait even if not in ``states`` (so waiting for RUNNING does not hang on a
    job that already failed): compare the returned state. Raises TimeoutError after ``timeout`` seconds.
    """
    wanted = set(states) | set(TERMINAL_STATES)
    deadline = time.monotonic() + timeout
    state = None
    while True:
        state = job_state(cluster, job_id)
        if state in wanted:
            return state
        if time.monotonic() > deadline:
            info = job_info(cluster, job_id) or {}
            raise TimeoutError(
                f"job {job_id} still {state} after {timeout:.0f} s (Reason={info.get('Reason')}, "
                f"Restarts={info.get('Restarts')}); waited for {sorted(set(states))}"
            )
        time.sleep(poll)


# --------------------------------------------------------------------------------------------- helpers


def _short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def _ensure_resolvable(name: str) -> None:
    """slurmd and slurmctld look their host up by name: make ``hostname -s`` resolve."""
    try:
        socket.gethostbyname(name)
    except OSError:
        with open("/etc/hosts", "a") as hosts:
            hosts.write(f"127.0.0.1\t{name}\t# added by chimera tests/slurm_cluster.py\n")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _munge_answers() -> bool:
    munge = _which("munge")
    if munge is None:
        return False
    result = subprocess.run([munge, "--no-input"], capture_output=True, check=False)
    return result.returncode == 0


def _run_checked(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {_last_line(result.stderr or result.stdout)}")


def _terminate(process: subprocess.Popen, grace: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a pid from a later reuse of it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before ")" may hold spaces


def _owner_alive(tmp: Path) -> bool:
    """Whether the process that started the cluster in ``tmp`` still runs (and, if it is us, still uses it)."""
    try:
        pid_text, start = (tmp / "owner").read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    if pid == os.getpid():
        return any(cluster.tmp == tmp for cluster in _LIVE)
    return _start_time(pid) == start


def _other_live_clusters(tmp: Path) -> bool:
    """Whether a cluster other than the one in ``tmp`` (of this or another process) still runs."""
    return any(Path(conf).parent != tmp and _owner_alive(Path(conf).parent) for _pid, conf in _cluster_processes())


def _protected_pids() -> set[int]:
    """This process and its ancestors: never killed, whatever their environment says."""
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _cluster_processes() -> list[tuple[int, str]]:
    """(pid, slurm.conf) of every process whose SLURM_CONF (or ``-f``) is a slurm.conf of ours."""
    found = []
    protected = _protected_pids()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in protected:
            continue
        try:
            environ = Path(f"/proc/{entry.name}/environ").read_bytes().split(b"\0")
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        candidates = [item[len(b"SLURM_CONF=") :] for item in environ if item.startswith(b"SLURM_CONF=")]
        candidates += [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == b"-f"]
        for candidate in candidates:
            conf = candidate.decode(errors="replace")
            if _OUR_CONF.search(conf):
                found.append((int(entry.name), conf))
                break
    return found


def _kill_processes_of(confs: set[str], timeout: float = 10.0) -> list[int]:
    """SIGKILL every process that belongs to one of the clusters ``confs``, until none is left."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        pids = [pid for pid, conf in _cluster_processes() if conf in confs]
        if not pids:
            return killed
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of Slurm cluster(s) {sorted(confs)} survive SIGKILL: {pids}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
