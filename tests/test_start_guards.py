"""`start` never takes over what another run serves, and rank 0 never removes what is not its
stale socket: a live ring without its state file, a taken port, a concurrent launch.py."""

from __future__ import annotations

import http.server
import shutil
import socket
import stat
import threading
from pathlib import Path

import pytest

from ringserve.cluster.run_lock import run_lock
from ringserve.cluster.state import RunState
from ringserve.cluster.supervisor import Supervisor
from ringserve.config.settings import Settings
from ringserve.errors import LaunchError
from ringserve.ipc.rank_server import claim_socket_path
from tests.ring import launch, ring_env, running_ring


def test_rank_zero_claims_only_a_missing_path_or_a_stale_socket(tmp_path: Path) -> None:
    fresh = tmp_path / "new" / "rank0.sock"
    claim_socket_path(fresh)
    assert stat.S_IMODE(fresh.parent.stat().st_mode) == 0o700

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    claim_socket_path(shared / "rank0.sock")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755  # not ours to narrow

    (shared / "notes.txt").write_text("keep me")
    with pytest.raises(LaunchError, match="not a socket"):
        claim_socket_path(shared / "notes.txt")
    assert (shared / "notes.txt").read_text() == "keep me"

    path = shared / "live.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen(1)
        with pytest.raises(LaunchError, match="another ring is serving"):
            claim_socket_path(path)
        assert path.exists()
    claim_socket_path(path)  # nobody listens any more: a stale socket goes
    assert not path.exists()


@pytest.mark.e2e
def test_a_second_start_leaves_a_live_ring_without_state_alone(
    tmp_path: Path, models_dir: Path
) -> None:
    with running_ring(tmp_path / "run", models_dir, ranks=2) as ring:
        client = ring.client()
        state = ring.run_dir / "state.json"
        shutil.move(state, tmp_path / "state.json")
        try:
            again = ring.launch("start", check=False)
            assert again.returncode != 0
            assert "a ring is serving on" in again.stdout + again.stderr
            reply = client.completions.create(model="m", prompt="hi", max_tokens=2)
            assert reply.choices
        finally:
            shutil.move(tmp_path / "state.json", state)


@pytest.mark.e2e
def test_start_refuses_a_taken_api_port(tmp_path: Path, models_dir: Path) -> None:
    env = ring_env(tmp_path / "run", models_dir, ranks=1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(env["RINGSERVE_API_PORT"])))
        taken.listen(1)
        result = launch(env, "start", check=False)
    assert result.returncode != 0
    assert "is taken" in result.stdout + result.stderr
    assert not (tmp_path / "run" / "state.json").exists()


def test_one_launch_at_a_time_per_run_directory(tmp_path: Path, models_dir: Path) -> None:
    env = ring_env(tmp_path / "run", models_dir, ranks=1)
    with run_lock(tmp_path / "run"):
        result = launch(env, "stop", check=False)
    assert result.returncode != 0
    assert "another launch.py is starting or stopping" in result.stdout + result.stderr
    launch(env, "stop")  # the lock went with its holder


def test_start_waits_for_its_own_api_not_whatever_answers_on_the_port(tmp_path: Path) -> None:
    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"ready": true}'
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready) as other:
        threading.Thread(target=other.serve_forever, daemon=True).start()
        state = RunState(
            run_id="ours",
            started_at=0,
            model="m",
            demo_model=True,
            launcher="direct",
            backend="ring",
            api_url=f"http://127.0.0.1:{other.server_address[1]}",
            processes=(),
        )
        with pytest.raises(LaunchError, match="another process answers"):
            Supervisor(Settings(run_dir=tmp_path)).wait_ready(state, timeout=1.5)
        other.shutdown()
