"""Start a real ring with `launch.py` for a test, and always stop it afterwards."""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
from mlx_lm.utils import load_tokenizer

from ringserve.cluster.local import pid_alive
from ringserve.cluster.spec import RankProcess
from ringserve.cluster.state import ProcessRecord, RunState, load_state
from ringserve.platform.blas import MKL_MACHINES, blas_wanted, cpu_build_installed, mapped_files

PROJECT_DIR = Path(__file__).resolve().parents[1]
# Where setup installs MKL for MLX's CPU build (pyproject.toml's `cpu` extra).
MKL_EXPECTED = (
    blas_wanted("auto", sys.platform, cpu_build_installed()) and platform.machine() in MKL_MACHINES
)


def within(seconds: float, condition: Callable[[], bool]) -> bool:
    """Whether `condition` holds at some point within `seconds` (asked every 0.1 s)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def free_port(span: int = 1) -> int:
    """A port with `span` free ports from it (the ring uses one port per rank)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + span >= 65000:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + span):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


@dataclass
class Ring:
    env: dict[str, str]
    run_dir: Path
    start_log: str = ""  # what `launch.py start` printed on stderr

    @property
    def state(self) -> RunState:
        state = load_state(self.run_dir)
        assert state is not None, "the ring has no run state"
        return state

    @property
    def url(self) -> str:
        return self.state.api_url

    def client(self, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", **kwargs)  # type: ignore[arg-type]

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)

    def launch(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return launch(self.env, *args, check=check)

    def pids(self) -> list[int]:
        return [p.pid for p in self.state.processes]

    def rank_reports(self) -> list[dict[str, Any]]:
        """Each rank's telemetry, as GET /gpu/info gives it."""
        with self.http() as http:
            reply = http.get("/gpu/info")
        assert reply.status_code == 200, reply.text
        ranks: list[dict[str, Any]] = reply.json()["ranks"]
        return ranks


def mapped(pid: int) -> list[str]:
    """The files process `pid` has mapped (the test hosts share this machine's PID space)."""
    return mapped_files(Path(f"/proc/{pid}/maps").read_text())


def local_record(process: RankProcess) -> ProcessRecord:
    """How a run records a process started on this machine."""
    return ProcessRecord(
        role="rank",
        rank=process.rank,
        host="localhost",
        pid=process.pid,
        log_path=process.log_path,
        identity=process.identity,
    )


def no_eos(model_dir: Path) -> dict[str, float]:
    """A logit_bias that forbids the model's end tokens: an answer then runs to max_tokens."""
    return {str(eos): -100.0 for eos in load_tokenizer(model_dir).eos_token_ids}


def ring_env(run_dir: Path, models_dir: Path, ranks: int = 2, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGSERVE_")}
    env.update(
        RINGSERVE_DEMO_SIZE="tiny",
        RINGSERVE_MODELS_DIR=str(models_dir),
        RINGSERVE_RUN_DIR=str(run_dir),
        RINGSERVE_LOCAL_RANKS=str(ranks),
        RINGSERVE_API_PORT=str(free_port()),
        RINGSERVE_RING_PORT=str(free_port(ranks)),
        RINGSERVE_START_TIMEOUT="120",
    )
    env.update({f"RINGSERVE_{k.upper()}": v for k, v in settings.items()})
    return env


def launch(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "launch.py"), *args],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"launch.py {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


@contextlib.contextmanager
def running_ring(
    run_dir: Path, models_dir: Path, ranks: int = 2, **settings: str
) -> Iterator[Ring]:
    """A started ring; stopped on exit whatever happened, and checked to leave no process."""
    with started_ring(ring_env(run_dir, models_dir, ranks, **settings), run_dir) as ring:
        yield ring


@contextlib.contextmanager
def started_ring(env: dict[str, str], run_dir: Path) -> Iterator[Ring]:
    """`launch.py start` with `env`; on exit `stop`, then check that every recorded PID is gone
    (every PID, remote ones included: the test hosts share this machine's PID space)."""
    ring = Ring(env=env, run_dir=run_dir)
    try:
        ring.start_log = launch(env, "start").stderr
        yield ring
    finally:
        stop_and_check(ring)


@contextlib.contextmanager
def rings_together(*contexts: contextlib.AbstractContextManager[Ring]) -> Iterator[list[Ring]]:
    """Rings started at once; each one that started is stopped, whatever failed."""
    with contextlib.ExitStack() as stack:
        with ThreadPoolExecutor(len(contexts)) as pool:
            started = [pool.submit(context.__enter__) for context in contexts]
        for context, future in zip(contexts, started, strict=True):
            if future.exception() is None:
                stack.push(context.__exit__)
        yield [future.result() for future in started]


def stop_and_check(ring: Ring) -> None:
    state = load_state(ring.run_dir)
    stopped = ring.launch("stop", check=False)
    if state is not None:
        left = [p.pid for p in state.processes if pid_alive(p.pid)]
        assert not left, f"processes left after stop: {left}\n{stopped.stderr}"


def processes_of(run_dir: Path) -> list[int]:
    """Live processes started for this run directory (every rank and the API carry it)."""
    marker = f"RINGSERVE_RUN_DIR={run_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ:
            found.append(int(entry.name))
    return found


def refused(env: dict[str, str], run_dir: Path) -> tuple[int, str]:
    """`start` that must fail before starting anything: its exit code and its one line."""
    try:
        result = launch(env, "start", check=False)
        lines = [line for line in result.stderr.splitlines() if line.startswith("ringserve:")]
        assert len(lines) == 1, result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        assert not (run_dir / "state.json").exists()
        assert not list(run_dir.glob("**/rank*.log"))
        assert not processes_of(run_dir)
        assert "Traceback" in (run_dir / "launch.log").read_text()  # the log keeps it
        return result.returncode, lines[0]
    finally:
        launch(env, "stop", check=False)
