"""A single-node SLURM cluster on loopback, for the cluster tests (tests/test_slurm.py) and the
cluster benchmark (benchmarks/slurm_walltime.py); docs/design.md section 9.

Debian's ``slurmctld``, ``slurmd`` and ``munge`` run as root with every file they write (keys,
sockets, configuration, state, logs, pid files) inside one temporary directory; this machine's
own configuration is never read. The one exception is forced by the Snakemake SLURM executor:
its job-side step removes ``SLURM_CONF`` from the environment before calling ``srun``, so
``srun`` reads ``/etc/slurm/slurm.conf``; the cluster links its configuration there while it
runs and removes the link when it stops (an existing file there is never touched: the cluster
refuses to start instead).

Finished jobs stay known to the controller for ``MinJobAge`` (600 s), which is how tests learn
each job's final state and resources from the scheduler without a SLURM database.

    with SingleNodeSlurm(directory) as cluster:
        subprocess.run([...], env=os.environ | cluster.env)
        cluster.jobs()  # {'2': {'JobState': 'COMPLETED', 'NumCPUs': '2', ...}, ...}
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("mungekey", "sinfo", "sbatch", "squeue", "scontrol", "srun")
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


def missing_requirements() -> str | None:
    """Why a cluster cannot start here, or None when it can."""
    if os.geteuid() != 0:
        return "the SLURM test cluster runs its daemons as root; this process is not root"
    missing = [name for name in DAEMONS + COMMANDS if shutil.which(name, path=_SEARCH_PATH) is None]
    if missing:
        return (
            f"SLURM/munge programs not found: {', '.join(missing)} "
            "(apt-get install slurmctld slurmd slurm-client munge)"
        )
    if SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink():
        if not _is_stale_link(SYSTEM_CONF):
            return f"{SYSTEM_CONF} exists; the test cluster will not replace a real SLURM configuration"
    return None


_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _program(name: str) -> str:
    path = shutil.which(name, path=_SEARCH_PATH)
    if path is None:
        raise FileNotFoundError(f"{name} not found on PATH or in /usr/sbin")
    return path


def _is_stale_link(path: Path) -> bool:
    """A symlink left by an earlier test cluster (one that was killed before it could stop): its
    directory is gone, or it is a test cluster's directory whose controller no longer runs.

    Such a link costs more than a skipped test: every Snakemake start loads the SLURM plugin,
    which asks the controller of /etc/slurm/slurm.conf for its settings and waits about 9 s for
    a dead one.
    """
    if not path.is_symlink():
        return False
    if not path.exists():
        return True
    directory = path.resolve().parent
    if not (directory / "munge.key").is_file():  # not a directory this class wrote
        return False
    try:
        pid = int((directory / "slurmctld.pid").read_text())
    except (OSError, ValueError):
        return True
    return not _is_running(pid)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SingleNodeSlurm:
    """One controller and one compute node on 127.0.0.1, all state under ``directory``.

    ``cpus`` and ``memory_mb`` are what the node offers to jobs (``cpus`` may exceed the machine's
    cores: slurmd takes the configured values as given); ``gpus`` fake GPUs (gres backed by
    /dev/null) let rules that request ``gpu`` be scheduled.
    """

    def __init__(self, directory: Path, cpus: int | None = None, memory_mb: int = 16000, gpus: int = 1):
        self.directory = Path(directory)
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb
        self.gpus = gpus
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.directory / "slurm.conf"
        self._pidfiles = {name: self.directory / f"{name}.pid" for name in DAEMONS}
        self._linked_system_conf = False

    @property
    def env(self) -> dict[str, str]:
        """Environment for SLURM client commands (sbatch, squeue, ...) and Snakemake."""
        return {"SLURM_CONF": str(self.conf)}

    # -- life cycle ------------------------------------------------------------------------------

    def __enter__(self) -> SingleNodeSlurm:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        reason = missing_requirements()
        if reason is not None:
            raise RuntimeError(reason)
        try:
            self._write_files()
            self._link_system_conf()
            self._run_daemon(
                "munged",
                [
                    _program("munged"),
                    "--socket",
                    str(self._munge_socket),
                    "--key-file",
                    str(self._munge_key),
                    "--pid-file",
                    str(self._pidfiles["munged"]),
                    "--log-file",
                    str(self.directory / "munged.log"),
                    "--seed-file",
                    str(self.directory / "munged.seed"),
                    "--force",
                ],
            )
            self._wait_for(lambda: self._munge_socket.exists(), "munged's socket")
            self._run_daemon("slurmctld", [_program("slurmctld"), "-f", str(self.conf), "-i"])
            self._run_daemon("slurmd", [_program("slurmd"), "-f", str(self.conf), "-N", self.node])
            self._wait_for(self._node_is_idle, f"node {self.node} to be idle")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every daemon this cluster started, by the PID in its pidfile; remove the link."""
        pids = self.daemon_pids()
        for name in reversed(DAEMONS):
            if name in pids:
                _terminate(pids[name])
                self._pidfiles[name].unlink(missing_ok=True)
        if self._linked_system_conf:
            SYSTEM_CONF.unlink(missing_ok=True)
            self._linked_system_conf = False

    # -- queries -------------------------------------------------------------------------------

    def jobs(self) -> dict[str, dict[str, str]]:
        """Every job the controller knows (running, or finished less than MinJobAge ago), by job
        id, as ``scontrol show job`` reports it: JobState, ExitCode, NumCPUs, MinMemoryNode,
        TresPerJob, ..."""
        result = subprocess.run(
            [_program("scontrol"), "--oneliner", "show", "job"],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ | self.env,
            timeout=30,
        )
        records = [_parse_fields(line) for line in result.stdout.splitlines() if line.startswith("JobId=")]
        return {record["JobId"]: record for record in records}

    def daemon_pids(self) -> dict[str, int]:
        """PID of each running daemon this cluster started, from its pidfile."""
        return {
            name: int(pidfile.read_text().split()[0])
            for name, pidfile in self._pidfiles.items()
            if pidfile.exists()
        }

    def logs(self) -> str:
        """The daemons' logs, for failure messages."""
        parts = []
        for name in DAEMONS:
            log = self.directory / f"{name}.log"
            if log.exists():
                parts.append(f"--- {log.name} ---\n{log.read_text()[-4000:]}")
        return "\n".join(parts)

    # -- internals -----------------------------------------------------------------------------

    @property
    def _munge_socket(self) -> Path:
        return self.directory / "munge.socket"

    @property
    def _munge_key(self) -> Path:
        return self.directory / "munge.key"

    def _write_files(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "spool"):
            (self.directory / sub).mkdir(exist_ok=True)
        subprocess.run([_program("mungekey"), "--create", "--keyfile", str(self._munge_key)], check=True)
        self._munge_key.chmod(0o600)
        d = self.directory
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=tqtest",
                    f"SlurmctldHost={self.node}(127.0.0.1)",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self._munge_socket}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "SlurmdParameters=config_overrides",  # the node offers `cpus`, even more than it has
                    "MpiDefault=none",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "ReturnToService=2",
                    "SchedulerType=sched/backfill",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    "MinJobAge=600",
                    "AccountingStorageType=accounting_storage/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "JobCompType=jobcomp/none",
                    f"StateSaveLocation={d / 'state'}",
                    f"SlurmdSpoolDir={d / 'spool'}",
                    f"SlurmctldPidFile={self._pidfiles['slurmctld']}",
                    f"SlurmdPidFile={self._pidfiles['slurmd']}",
                    f"SlurmctldLogFile={d / 'slurmctld.log'}",
                    f"SlurmdLogFile={d / 'slurmd.log'}",
                    "GresTypes=gpu" if self.gpus else "",
                    f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} "
                    f"RealMemory={self.memory_mb}{gres} State=UNKNOWN",
                    "PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        if self.gpus:
            (d / "gres.conf").write_text(f"NodeName={self.node} Name=gpu Count={self.gpus} File=/dev/null\n")

    def _link_system_conf(self) -> None:
        if _is_stale_link(SYSTEM_CONF):
            SYSTEM_CONF.unlink()
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_CONF.symlink_to(self.conf)
        self._linked_system_conf = True

    def _run_daemon(self, name: str, argv: list[str]) -> None:
        """Start a daemon that forks into the background and writes its pidfile."""
        result = subprocess.run(argv, capture_output=True, text=True, env=os.environ | self.env, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"{name} exited with {result.returncode}: {result.stderr}\n{self.logs()}")
        self._wait_for(lambda: self._pidfiles[name].exists(), f"{name}'s pidfile")

    def _node_is_idle(self) -> bool:
        self._check_daemons_alive()
        result = subprocess.run(
            [_program("sinfo"), "--noheader", "--Node", "--format=%T"],
            capture_output=True,
            text=True,
            env=os.environ | self.env,
            timeout=10,
        )
        return result.returncode == 0 and result.stdout.strip() == "idle"

    def _check_daemons_alive(self) -> None:
        for name, pid in self.daemon_pids().items():
            if not _is_running(pid):
                raise RuntimeError(f"{name} exited during start-up\n{self.logs()}")

    def _wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"waited {START_TIMEOUT_S:.0f} s for {what}\n{self.logs()}")
            time.sleep(0.2)


def _parse_fields(line: str) -> dict[str, str]:
    """``Key=value Key=value ...`` (scontrol --oneliner) as a dict; values without spaces."""
    return dict(field.split("=", 1) for field in line.split() if "=" in field)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _terminate(pid: int) -> None:
    """SIGTERM, then SIGKILL if the process outlives STOP_TIMEOUT_S."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _is_running(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
