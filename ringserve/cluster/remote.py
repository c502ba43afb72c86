"""The remote half: check a host's Python, start ranks there detached, find and stop them.

Everything that runs on the host is a short Python script passed as one argument (the host's
Python is checked first), so it behaves the same on Linux and macOS and needs no shell quoting.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from ringserve.cluster import process_identity
from ringserve.cluster.hosts import host_python, host_workdir
from ringserve.cluster.process_identity import OURS
from ringserve.cluster.push import PushSummary, push_project, write_remote_text
from ringserve.cluster.spec import RankLaunch, RankProcess
from ringserve.cluster.ssh import SshSession, connect
from ringserve.config.settings import HostSpec, Settings
from ringserve.errors import RemoteHostError
from ringserve.logs import LOG_FILE_VAR
from ringserve.platform.blas import MKL_DISTRIBUTION, blas_wanted, missing_mkl
from ringserve.platform.mlx_build import BUILD_PACKAGES

log = logging.getLogger(__name__)

# Its arguments name distributions whose installed versions it reports too.
PROBE = """
import importlib.metadata, json, platform, sys
found = {"python": sys.version.split()[0], "os": sys.platform, "machine": platform.machine()}
for name, module in (("mlx", "mlx.core"), ("mlx_lm", "mlx_lm")):
    try:
        found[name] = __import__(module, fromlist=["_"]).__version__
    except Exception as exc:
        found[name] = None
        found[name + "_error"] = f"{type(exc).__name__}: {exc}"
found["distributions"] = {}
for name in sys.argv[1:]:
    try:
        found["distributions"][name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        found["distributions"][name] = None
print(json.dumps(found))
"""

# The identity and stopping code every host runs, this machine included (standard library
# only): prepended to the scripts below.
IDENTITY = Path(process_identity.__file__).read_text()

SPAWN = (
    IDENTITY
    + """
import json, sys
spec = json.loads(sys.argv[1])
for path in (spec["log"], spec["pid"]):
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    os.chmod(os.path.dirname(path) or ".", 0o700)
def private(path, flags):
    fd = os.open(path, flags | os.O_WRONLY | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return fd
env = dict(os.environ, **spec["env"])
with os.fdopen(private(spec["log"], os.O_APPEND), "ab") as log:
    child = subprocess.Popen(
        spec["argv"], cwd=spec["cwd"] or None, env=env, stdin=subprocess.DEVNULL,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
with os.fdopen(private(spec["pid"] + ".tmp", os.O_TRUNC), "w") as handle:
    handle.write(f"{child.pid}\\n")
os.replace(spec["pid"] + ".tmp", spec["pid"])
print(json.dumps({"pid": child.pid, "identity": new_process_identity(child.pid)}))
"""
)

# Stop groups given as {pgid: identity}: prints {pgid: outcome}.
STOP = (
    IDENTITY
    + """
import json, sys
groups = {int(pid): identity for pid, identity in json.loads(sys.argv[1]).items()}
print(json.dumps(stop_groups(groups, float(sys.argv[2]))))
"""
)

# Whose each pid is (ours, foreign, gone) and its resident memory: /proc on Linux, `ps`
# elsewhere (macOS). Given {pid: identity}, prints {pid: [owner, rss]}.
PROCESS_INFO = (
    IDENTITY
    + """
import json, sys

def rss(pid):
    try:
        with open(f"/proc/{pid}/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
        words = fields.get("VmRSS", "").split()
        return int(words[0]) * 1024 if words else None
    except OSError:
        pass
    ps = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
    words = ps.stdout.split()
    return int(words[0]) * 1024 if ps.returncode == 0 and words else None

found = {}
for pid, identity in json.loads(sys.argv[1]).items():
    owner = ownership(int(pid), identity)
    found[pid] = [owner, rss(int(pid)) if owner == OURS else None]
print(json.dumps(found))
"""
)


@dataclass(frozen=True)
class HostReport:
    host: str
    python: str
    python_version: str
    mlx: str
    mlx_lm: str
    cpu_blas_problem: str | None = None  # why its ranks would compute with the bundled BLAS


def local_versions() -> dict[str, str]:
    """The mlx and mlx_lm versions of this machine, which every host must match."""
    import mlx.core
    import mlx_lm

    return {"mlx": str(getattr(mlx.core, "__version__")), "mlx_lm": str(mlx_lm.__version__)}  # noqa: B009


def host_blas_problem(found: Mapping[str, Any], cpu_blas: str) -> str | None:
    """From the probe's findings: why the host's ranks would compute with MLX's bundled BLAS
    where MKL is wanted; None when they would not."""
    distributions = found.get("distributions") or {}
    cpu_build = distributions.get(BUILD_PACKAGES["cpu"]) is not None
    if not blas_wanted(cpu_blas, str(found.get("os")), cpu_build):
        return None
    if distributions.get(MKL_DISTRIBUTION) is not None:
        return None
    return missing_mkl(str(found.get("machine")))


def check_python(
    session: SshSession,
    python: str,
    expected: Mapping[str, str] | None = None,
    cpu_blas: str = "auto",
) -> HostReport:
    """Check that `python` runs on the host and imports mlx and mlx_lm at the expected versions;
    warn when its ranks would compute with MLX's bundled BLAS (they still start)."""
    expected = local_versions() if expected is None else expected
    label = session.label
    fix_python = "set the host's python in RINGSERVE_HOSTS or RINGSERVE_REMOTE_PYTHON"
    result = session.run([python, "-c", PROBE, BUILD_PACKAGES["cpu"], MKL_DISTRIBUTION])
    if result.rc != 0:
        reason = (result.err.strip().splitlines() or [f"exit status {result.rc}"])[-1]
        raise RemoteHostError(f"{label}: python {python!r} does not run ({reason}); {fix_python}")
    try:
        found = json.loads(result.out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RemoteHostError(
            f"{label}: python {python!r} printed no version report; {fix_python}"
        ) from None
    for name in ("mlx", "mlx_lm"):
        want = expected.get(name)
        if found.get(name) is None:
            raise RemoteHostError(
                f"{label}: {python} cannot import {name} ({found.get(name + '_error')}); "
                f"install {name}=={want} there (scripts/setup.sh) or {fix_python}"
            )
        if want is not None and found[name] != want:
            raise RemoteHostError(
                f"{label}: {python} has {name} {found[name]} but this machine has {want}; "
                f"install {name}=={want} there so every rank runs the same code"
            )
    log.info(
        "%s: python %s, mlx %s, mlx_lm %s", label, found["python"], found["mlx"], found["mlx_lm"]
    )
    blas_problem = host_blas_problem(found, cpu_blas)
    if blas_problem is not None:
        log.warning(
            "%s: its ranks will compute with MLX's bundled reference BLAS, many times slower: "
            "%s (python %s)",
            label,
            blas_problem,
            python,
        )
    return HostReport(label, python, found["python"], found["mlx"], found["mlx_lm"], blas_problem)


def start_rank(session: SshSession, launch: RankLaunch, python: str) -> RankProcess:
    """Start a rank detached in its own session (pid = process group), output to its log."""
    if not launch.log_path or not launch.pid_path:
        raise ValueError(f"rank {launch.rank} needs a log_path and a pid_path to start remotely")
    spec = {
        "argv": list(launch.argv),
        "cwd": launch.cwd,
        "env": {**launch.env, LOG_FILE_VAR: launch.log_path},
        "log": launch.log_path,
        "pid": launch.pid_path,
    }
    result = session.run([python, "-c", SPAWN, json.dumps(spec)])
    try:
        started = json.loads(result.out.strip().splitlines()[-1])
        pid, identity = int(started["pid"]), started["identity"]
    except (ValueError, IndexError, KeyError, TypeError):
        reason = (result.err.strip().splitlines() or [result.out.strip() or "no output"])[-1]
        raise RemoteHostError(
            f"{session.label}: rank {launch.rank} did not start ({reason})"
        ) from None
    log.info(
        "%s: rank %d started, pid %d, log %s", session.label, launch.rank, pid, launch.log_path
    )
    return RankProcess(launch.rank, launch.host, pid, launch.log_path, launch.pid_path, identity)


def _run_json(session: SshSession, python: str, script: str, *args: str, timeout: float) -> Any:
    result = session.run([python, "-c", script, *args], timeout=timeout)
    try:
        return json.loads(result.out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        reason = (result.err.strip().splitlines() or [f"exit status {result.rc}"])[-1]
        raise RemoteHostError(f"{session.label}: cannot inspect its processes ({reason})") from None


def stop_groups_there(
    session: SshSession, python: str, groups: Mapping[int, str | None], grace: float = 5.0
) -> dict[int, str]:
    """SIGTERM each process group that is still ours (`groups`: pgid -> identity), SIGKILL it
    after `grace` seconds, verify it is gone; a pgid now another process's is left alone.
    Each group's outcome: gone, foreign, terminated, killed, or left <pids>."""
    if not groups:
        return {}
    found = _run_json(session, python, STOP, json.dumps(groups), str(grace), timeout=grace + 30)
    outcome = {int(pgid): str(result) for pgid, result in found.items()}
    for pgid, result in outcome.items():
        log.info("%s: process group %d %s", session.label, pgid, result)
    return outcome


def process_info(
    session: SshSession, python: str, processes: Mapping[int, str | None]
) -> dict[int, tuple[str, int | None]]:
    """For each pid (given with its identity): ours, foreign or gone, and its resident memory
    in bytes if it is ours and that is known."""
    if not processes:
        return {}
    found = _run_json(session, python, PROCESS_INFO, json.dumps(processes), timeout=60)
    try:
        return {int(pid): (str(owner), rss) for pid, (owner, rss) in found.items()}
    except (ValueError, TypeError):
        raise RemoteHostError(f"{session.label}: cannot inspect pids {list(processes)}") from None


def read_log_tail(session: SshSession, path: str, lines: int = 100) -> str:
    result = session.run(["tail", "-n", str(lines), path])
    if result.rc != 0:
        raise RemoteHostError(f"{session.label}: cannot read {path} ({result.err.strip()})")
    return result.out


class RemoteHost:
    """A configured host over one SSH connection: check, push, start, stop, read logs."""

    def __init__(self, spec: HostSpec, settings: Settings, session: SshSession) -> None:
        self.spec = spec
        self.settings = settings
        self.session = session
        self.workdir = host_workdir(spec, settings)
        self.python = host_python(spec, settings)

    @classmethod
    def open(cls, spec: HostSpec, settings: Settings) -> RemoteHost:
        return cls(spec, settings, connect(spec, settings))

    def __enter__(self) -> RemoteHost:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    def check(self, expected: Mapping[str, str] | None = None) -> HostReport:
        return check_python(self.session, self.python, expected, self.settings.cpu_blas)

    def push(self, project_dir: Path, show_progress: bool = True) -> PushSummary:
        return push_project(self.session, self.workdir, project_dir, show_progress)

    def write_files(self, files: Mapping[str, str]) -> None:
        """Write small files (a rank's MLX_HOSTFILE, say) at paths relative to the remote home."""
        sftp = self.session.sftp()
        try:
            for path, text in files.items():
                write_remote_text(sftp, path, text)
        finally:
            sftp.close()

    def start(self, launch: RankLaunch) -> RankProcess:
        return start_rank(self.session, launch, self.python)

    def alive(self, pid: int, identity: str | None) -> bool:
        return process_info(self.session, self.python, {pid: identity})[pid][0] == OURS

    def stop(self, groups: Mapping[int, str | None], grace: float = 5.0) -> dict[int, str]:
        return stop_groups_there(self.session, self.python, groups, grace)

    def process_info(
        self, processes: Mapping[int, str | None]
    ) -> dict[int, tuple[str, int | None]]:
        return process_info(self.session, self.python, processes)

    def log_tail(self, path: str, lines: int = 100) -> str:
        return read_log_tail(self.session, path, lines)


def check_host(
    spec: HostSpec, settings: Settings, expected: Mapping[str, str] | None = None
) -> HostReport:
    """Pre-flight for one host: reachable, authenticated, python with matching mlx and mlx_lm."""
    with RemoteHost.open(spec, settings) as host:
        return host.check(expected)
