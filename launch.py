"""ringserve's controller: `python launch.py start|stop|restart|status|logs|test`."""

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
from ringserve.cluster.local import pid_alive, tail
from ringserve.cluster.status_view import print_gpu_section
from ringserve.cluster.supervisor import Supervisor
from ringserve.config.settings import Settings, load_settings
from ringserve.errors import LaunchError, RingserveError
from ringserve.logs import setup_logging
from ringserve.model.paths import resolve_model

console = Console(stderr=True)


def cmd_start(settings: Settings) -> int:
    demo = not settings.model
    with console.status("preparing the model…"):
        model_path = resolve_model(settings)
    if demo:
        console.print(
            f"[yellow]No RINGSERVE_MODEL set: serving the built-in {settings.demo_size} demo "
            f"model at {model_path}. Its weights are random, so its answers are gibberish. "
            "Set RINGSERVE_MODEL in .env to a local mlx-lm model directory or a Hugging Face "
            "repo id (e.g. mlx-community/Qwen3-4B-4bit) to serve a real model.[/yellow]"
        )
    supervisor = Supervisor(settings)
    state = supervisor.start(model_path, demo)
    ranks = len(state.ranks)
    started = time.monotonic()
    try:
        with console.status(f"loading the model on {settings.world_size} rank(s)…"):
            supervisor.wait_ready(state, settings.start_timeout)
    except LaunchError:
        supervisor.stop()
        raise
    console.print(
        f"[green]ready[/green] in {time.monotonic() - started:.1f} s: {settings.world_size} "
        f"rank(s) ({ranks} process(es), launcher {settings.launcher}, backend "
        f"{settings.backend}); OpenAI API at {state.api_url}/v1 — logs in "
        f"{settings.run_dir / 'logs'}"
    )
    return 0


def cmd_stop(settings: Settings) -> int:
    left = Supervisor(settings).stop()
    if left:
        names = ", ".join(
            f"{p.role} {p.rank if p.rank is not None else ''} pid {p.pid}" for p in left
        )
        raise LaunchError(f"these processes would not stop: {names}")
    console.print("stopped: no ringserve process is left")
    return 0


def cmd_restart_api(settings: Settings) -> int:
    record = restart_api(settings)
    state, _ = Supervisor(settings).status()
    assert state is not None
    Supervisor(settings).wait_ready(state, settings.start_timeout)
    console.print(f"API restarted (pid {record.pid}); the ranks kept running")
    return 0


def cmd_status(settings: Settings) -> int:
    state, health = Supervisor(settings).status()
    if state is None or health is None:
        console.print("not running (no run state in " + str(settings.run_dir) + ")")
        return 1
    uptime = time.time() - state.started_at
    table = Table(title=f"ringserve — {state.model}")
    for column in ("process", "host", "pid", "alive", "log"):
        table.add_column(column)
    all_alive = True
    for process in state.processes:
        alive = pid_alive(process.pid)
        all_alive &= alive
        name = "api" if process.role == "api" else f"rank {process.rank}"
        mark = "[green]yes[/green]" if alive else "[red]DEAD[/red]"
        table.add_row(name, process.host, str(process.pid), mark, process.log_path)
    Console().print(table)
    ready = "[green]ready[/green]" if health.get("ready") else "[red]not ready[/red]"
    Console().print(
        f"API {state.api_url}: {ready} {health.get('reason') or ''}\n"
        f"launcher {state.launcher}, backend {state.backend}, uptime {uptime / 60:.1f} min"
    )
    if health.get("ready"):
        print_gpu_section(Console(), state.api_url, settings.api_key)
    return 0 if all_alive and health.get("ready") else 1


def cmd_logs(settings: Settings, which: str, lines: int) -> int:
    path = settings.run_dir / "logs" / ("api.log" if which == "api" else f"rank{which}.log")
    if not path.is_file():
        raise LaunchError(f"no log at {path}")
    print(tail(Path(path), lines))
    return 0


def cmd_test(settings: Settings) -> int:
    """Send one chat request to the running server and print the answer."""
    state, _ = Supervisor(settings).status()
    url = state.api_url if state else f"http://127.0.0.1:{settings.api_port}"
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("start", "stop", "restart", "status", "test"):
        sub.add_parser(name)
    sub.add_parser("restart-api", help="restart only the API process (the model stays loaded)")
    logs = sub.add_parser("logs", help="show the end of a rank's or the API's log")
    logs.add_argument("which", nargs="?", default="0", help="a rank number or 'api'")
    logs.add_argument("-n", "--lines", type=int, default=50)
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        setup_logging(settings.log_level, "launch")
        logging.getLogger("httpx").setLevel(logging.WARNING)
        if args.command == "start":
            return cmd_start(settings)
        if args.command == "stop":
            return cmd_stop(settings)
        if args.command == "restart":
            cmd_stop(settings)
            return cmd_start(settings)
        if args.command == "restart-api":
            return cmd_restart_api(settings)
        if args.command == "status":
            return cmd_status(settings)
        if args.command == "logs":
            return cmd_logs(settings, args.which, args.lines)
        return cmd_test(settings)
    except RingserveError as exc:
        console.print(f"[red]ringserve:[/red] {escape(str(exc))}", highlight=False)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
