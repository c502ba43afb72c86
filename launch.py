"""ringserve's controller: `python launch.py start|stop|restart|status|logs|test`.

With RINGSERVE_HOSTS set, `start` finds this machine among the hosts (it runs rank 0 and the
API), checks every other host over SSH (reachable, key accepted, a Python with the same mlx and
mlx_lm), pushes the project there (only changed files) and starts its ranks; `stop`, `status`
and `logs N` reach every host the same way. Before any rank starts, the model is checked on
every host and a Hugging Face repo id is fetched by each host into its own cache; `models`
lists this host's cache. `start` leaves a keeper (ringserve/cluster/keeper.py) that restarts a
ring that lost a rank; `stop` stops it first.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ringserve.cluster.api_process import restart_api
from ringserve.cluster.local import tail
from ringserve.cluster.processes import log_tail
from ringserve.cluster.run_lock import run_lock
from ringserve.cluster.state import load_state, private_dir
from ringserve.cluster.status_view import print_gpu_section, print_split_section
from ringserve.cluster.supervisor import Supervisor
from ringserve.config.settings import Settings, exposure_warning, load_settings
from ringserve.errors import LaunchError, RingserveError
from ringserve.ipc.keeper_report import KeeperReport, read_report
from ringserve.logs import PrivateLog, setup_logging
from ringserve.model.paths import configured_model, resolve_model
from ringserve.model.prepare import serve_request
from ringserve.model.source import looks_like_hub_id
from ringserve.platform.blas import blas_threads, cpus_allowed, load_cpu_blas, log_cpu_blas
from ringserve.platform.process_env import prepare_process_environment, require_mlx
from ringserve.telemetry.memory import human_bytes

console = Console(stderr=True)
# The traceback of a failure goes only to launch.log; the console shows its one line.
failures = logging.getLogger("ringserve.launch.failures")
failures.propagate = False
failures.addHandler(logging.NullHandler())


def keep_log(path: Path) -> None:
    """What the launcher logs also goes to `path`, with the traceback of any failure."""
    private_dir(path.parent)
    handler = PrivateLog(str(path))
    handler.setFormatter(logging.getLogger().handlers[0].formatter)
    logging.getLogger().addHandler(handler)
    failures.setLevel(logging.DEBUG)
    failures.addHandler(handler)


def cmd_start(settings: Settings) -> int:
    demo = not settings.model
    # The demo model is built here: this process computes with MKL too, on every CPU it has.
    blas_problem = load_cpu_blas(settings.cpu_blas, blas_threads(cpus_allowed(), 1))
    require_mlx()
    log_cpu_blas(settings.cpu_blas, blas_problem)
    if demo:
        with console.status("preparing the demo model…"):
            model_path = resolve_model(settings)
        console.print(
            f"[yellow]No RINGSERVE_MODEL set: serving the built-in {settings.demo_size} demo "
            f"model at {model_path}. Its weights are random, so its answers are gibberish. "
            "Set RINGSERVE_MODEL in .env to a local mlx-lm model directory or a Hugging Face "
            "repo id (e.g. mlx-community/Qwen3-4B-4bit) to serve a real model.[/yellow]"
        )
    else:
        model_path = configured_model(settings)  # checked and fetched on every host first
    supervisor = Supervisor(settings, console)
    state = supervisor.start(model_path, demo)
    ranks = len(state.ranks)
    started = time.monotonic()
    try:
        with console.status(f"loading the model on {settings.world_size} rank(s)…"):
            supervisor.wait_ready(state, settings.start_timeout)
        supervisor.wait_keeper(state)
    except (LaunchError, KeyboardInterrupt):
        # A start that fails or is interrupted leaves nothing running behind it.
        supervisor.stop()
        raise
    console.print(
        f"[green]ready[/green] in {time.monotonic() - started:.1f} s: {settings.world_size} "
        f"rank(s) ({ranks} process(es), launcher {settings.launcher}, backend "
        f"{settings.backend}); OpenAI API at {state.api_url}/v1, console at "
        f"{state.api_url}/ — logs in "
        f"{settings.run_dir / 'logs'}"
    )
    warning = exposure_warning(settings)
    if warning is not None:
        console.print(f"[yellow]warning: {warning}[/yellow]", highlight=False)
    return 0


def cmd_stop(settings: Settings) -> int:
    report = Supervisor(settings).stop()
    if report.left:
        raise LaunchError(
            "could not verify that everything stopped (the run state keeps these; run "
            "`launch.py stop` again):\n  " + "\n  ".join(report.problems)
        )
    console.print("stopped: no ringserve process is left on any host")
    return 0


def cmd_restart_api(settings: Settings) -> int:
    record = restart_api(settings)
    state = load_state(settings.run_dir)
    assert state is not None
    Supervisor(settings).wait_ready(state, settings.start_timeout)
    console.print(f"API restarted (pid {record.pid}); the ranks kept running")
    return 0


def _memory(rss: int | None) -> str:
    return "-" if rss is None else f"{rss / 2**20:.0f} MiB"


def cmd_status(settings: Settings) -> int:
    status = Supervisor(settings).status()
    if status is None:
        console.print("not running (no run state in " + str(settings.run_dir) + ")")
        return 1
    state, health = status.state, status.health
    uptime = time.time() - state.started_at
    table = Table(title=f"ringserve — {state.model}")
    for column in ("process", "host", "pid", "alive", "memory", "log"):
        table.add_column(column)
    problems = []
    for process, info in zip(state.processes, status.processes, strict=True):
        if info.alive is None:
            mark = "[yellow]unknown[/yellow]"
            problems.append(f"{process.name} on {process.host}: {info.problem}")
        elif info.alive:
            mark = "[green]yes[/green]"
        else:
            mark = "[red]DEAD[/red]"
            problems.append(
                f"{process.name} (pid {process.pid} on {process.host}) is dead"
                + (f": {info.problem}" if info.problem else "")
            )
        table.add_row(
            process.label,
            process.host,
            str(process.pid),
            mark,
            _memory(info.rss_bytes),
            process.log_path,
        )
    Console().print(table)
    ready = "[green]ready[/green]" if health.get("ready") else "[red]not ready[/red]"
    Console().print(
        f"API {state.api_url}: {ready} {health.get('reason') or ''}\n"
        f"launcher {state.launcher}, backend {state.backend}, uptime {uptime / 60:.1f} min"
    )
    keeper = read_report(settings.run_dir)
    if keeper is not None:
        Console().print(restarts_line(keeper), highlight=False)
        if keeper.gave_up:
            problems.append(f"the keeper gave up: {keeper.gave_up}")
    if health.get("ready"):
        print_split_section(Console(), state.api_url, settings.auth_headers)
        print_gpu_section(Console(), state.api_url, settings.auth_headers)
    for problem in problems:
        console.print(f"[red]{problem}[/red]", highlight=False)
    return 0 if not problems and health.get("ready") else 1


def cmd_logs(settings: Settings, which: str, lines: int) -> int:
    record = Supervisor(settings).record(which)
    if record is not None:
        print(log_tail(record, settings, lines))
        return 0
    named = f"{which}.log" if which in ("api", "keeper") else f"rank{which}.log"
    path = settings.run_dir / "logs" / named
    if not path.is_file():
        raise LaunchError(f"no log at {path}")
    print(tail(Path(path), lines))
    return 0


def cmd_test(settings: Settings) -> int:
    """Send one chat request to the running server and print the answer."""
    state = load_state(settings.run_dir)
    url = state.api_url if state else f"http://127.0.0.1:{settings.api_port}"
    headers = settings.auth_headers
    body = {
        "messages": [{"role": "user", "content": "Say hello in five words."}],
        "max_tokens": 32,
    }
    started = time.monotonic()
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    if reply.status_code != 200:
        raise LaunchError(f"the test request failed with {reply.status_code}: {reply.text}")
    data = reply.json()
    console.print(f"answer: {data['choices'][0]['message']['content']!r}")
    console.print(f"usage: {data['usage']} in {time.monotonic() - started:.2f} s")
    return 0


def cmd_models(settings: Settings) -> int:
    """The models in this host's Hugging Face cache, and which one RINGSERVE_MODEL names."""
    from ringserve.model.cache import cached_models

    found, cache_dir = cached_models()
    table = Table(title=f"models in {cache_dir}")
    for column in ("", "model", "revision", "refs", "size", "architecture", "quantization"):
        table.add_column(column)
    wanted = settings.model_revision or "main"
    for entry in found:
        chosen = entry.repo_id == settings.model and (
            wanted in entry.refs or entry.commit.startswith(wanted)
        )
        table.add_row(
            "*" if chosen else "",
            entry.repo_id,
            entry.commit[:12],
            ",".join(sorted(entry.refs)) or "-",
            human_bytes(entry.size),
            entry.model_type or "-",
            entry.quantization or "-",
        )
    Console(width=200 if not sys.stdout.isatty() else None).print(table)
    if not settings.model:
        note = "RINGSERVE_MODEL is not set: `start` serves the built-in demo model"
    elif not looks_like_hub_id(settings.model):
        note = f"RINGSERVE_MODEL is the directory {settings.model}"
    elif any(e.repo_id == settings.model for e in found):
        note = f"* RINGSERVE_MODEL={settings.model} (revision {wanted})"
    else:
        note = f"RINGSERVE_MODEL={settings.model} is not cached here: `start` fetches it"
    console.print(note, highlight=False)
    return 0


def cmd_keep() -> int:
    try:
        settings = load_settings()
    except RingserveError as exc:
        print(f"ringserve: {exc}", file=sys.stderr)
        return exc.exit_code
    setup_logging(settings.log_level, "keeper")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from ringserve.cluster.keeper import Keeper

    return Keeper(settings).run()


def restarts_line(report: KeeperReport) -> str:
    """The keeper's account, in `status`: restarts, the last one's time and reason."""
    if report.restarts == 0:
        line = "keeper: no restart so far"
    else:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report.last_at or 0))
        ago = time.time() - (report.last_at or 0)
        line = (
            f"keeper: {report.restarts} restart(s); the last at {at} ({ago:.0f} s ago): "
            f"{report.last_reason}"
        )
    if report.restarting:
        line += " — restarting now"
    if report.left_out:
        line += f"; hosts left out: {', '.join(report.left_out)}"
    return line


def cmd_restart(settings: Settings) -> int:
    cmd_stop(settings)
    return cmd_start(settings)


# The commands that start or stop processes: one at a time per run directory.
CHANGING = {
    "start": cmd_start,
    "stop": cmd_stop,
    "restart": cmd_restart,
    "restart-api": cmd_restart_api,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launch.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("start", "stop", "restart", "status", "test"):
        sub.add_parser(name)
    sub.add_parser("restart-api", help="restart only the API process (the model stays loaded)")
    sub.add_parser("models", help="the models in this host's Hugging Face cache")
    # What `start` runs on the other hosts over SSH: a request on stdin, JSON lines out.
    sub.add_parser("prepare-model", help=argparse.SUPPRESS)
    logs = sub.add_parser("logs", help="show the end of a rank's or the API's log")
    logs.add_argument("which", nargs="?", default="0", help="a rank number, 'api' or 'keeper'")
    logs.add_argument("-n", "--lines", type=int, default=50)
    # What `start` leaves running to restart a ring that lost a rank (ringserve/cluster/keeper.py).
    sub.add_parser("keep", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command == "prepare-model":
        return serve_request(sys.stdin.read())
    if args.command == "keep":
        return cmd_keep()
    try:
        settings = load_settings()
        setup_logging(settings.log_level, "launch")
        keep_log(settings.run_dir / "launch.log")
        for noisy in ("httpx", "httpx2"):  # a line per request otherwise (huggingface_hub's too)
            logging.getLogger(noisy).setLevel(logging.WARNING)
        if args.command in CHANGING:
            with run_lock(settings.run_dir):
                return CHANGING[args.command](settings)
        if args.command == "status":
            return cmd_status(settings)
        if args.command == "logs":
            return cmd_logs(settings, args.which, args.lines)
        if args.command == "models":
            return cmd_models(settings)
        return cmd_test(settings)
    except RingserveError as exc:
        failures.error("`%s` failed: %s", args.command, exc, exc_info=True)
        console.print(f"[red]ringserve:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    # `start` imports MLX here (the demo model, the version check): on CUDA it needs the NVIDIA
    # wheels' libraries as much as a rank does.
    prepare_process_environment()
    sys.exit(main())
