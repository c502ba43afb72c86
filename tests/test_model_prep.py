"""What `start` sends another host to check and fetch the model, and how its answers read."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ringserve.cluster.model_hosts import request_for
from ringserve.cluster.model_plan import check_same_revision
from ringserve.config.settings import HostSpec, load_settings
from ringserve.errors import ModelUnavailableError
from ringserve.model.prepare import Failure, Prepared, ProgressLine, parse_line
from tests.ring import PROJECT_DIR

ENVIRON = {"HF_TOKEN": "hf_x", "HF_HOME": "/here", "HF_ENDPOINT": "", "PATH": "/bin"}


def test_a_host_gets_the_settings_and_hub_variables_but_never_the_api_key() -> None:
    settings = load_settings(
        PROJECT_DIR / "absent.env",
        {"RINGSERVE_MODEL": "org/m", "RINGSERVE_API_KEY": "secret", "RINGSERVE_LOCAL_RANKS": "2"},
    )
    spec = HostSpec(host="10.0.0.2", hf_home="/data/hf")
    request = request_for(spec, "me@10.0.0.2", settings, "fetch", ENVIRON)
    assert request.host == "me@10.0.0.2" and request.phase == "fetch"
    assert request.settings["RINGSERVE_MODEL"] == "org/m"
    assert "RINGSERVE_API_KEY" not in request.settings
    assert request.environment == {"HF_TOKEN": "hf_x", "HF_HOME": "/data/hf"}
    assert "secret" not in request.model_dump_json()

    plain = request_for(HostSpec(host="10.0.0.3"), "10.0.0.3", settings, "check", {})
    assert plain.environment == {}


def test_the_lines_a_host_prints_read_back_as_what_they_were() -> None:
    prepared = Prepared(
        host="b", path="/c/snapshots/abc", source="hub", model_type="qwen3", weight_bytes=10
    )
    for message in (prepared, ProgressLine(done=1, total=2), Failure(message="no", exit_code=5)):
        line = f'{{"{type(message).__name__}": {message.model_dump_json()}}}'
        assert parse_line(line) == message
    assert parse_line("some warning a library printed") is None
    assert parse_line('{"Other": {}}') is None


def test_a_directory_model_sends_no_hub_token() -> None:
    settings = load_settings(PROJECT_DIR / "absent.env", {"RINGSERVE_MODEL": "/models/m"})
    request = request_for(HostSpec(host="10.0.0.2"), "10.0.0.2", settings, "check", ENVIRON)
    assert request.environment == {}


def test_a_host_that_receives_the_model_gets_no_hub_variable() -> None:
    settings = load_settings(PROJECT_DIR / "absent.env", {"RINGSERVE_MODEL": "org/m"})
    spec = HostSpec(host="10.0.0.2", hf_home="/data/hf")
    request = request_for(spec, "10.0.0.2", settings, "check", ENVIRON, receives=True)
    assert request.receives and request.environment == {"HF_HOME": "/data/hf"}
    settle = request_for(spec, "10.0.0.2", settings, "settle", ENVIRON, revision="main")
    assert settle.environment == {"HF_HOME": "/data/hf"}


def test_hosts_with_different_revisions_of_a_model_are_refused() -> None:
    check_same_revision("org/m", {"a": "1" * 40, "b": "1" * 40})
    with pytest.raises(ModelUnavailableError, match=r"a: 111111111111; b: 222222222222"):
        check_same_revision("org/m", {"a": "1" * 40, "b": "2" * 40})


def test_a_host_reads_its_cache_where_the_request_says() -> None:
    """`launch.py prepare-model` sets HF_HOME from the request before huggingface_hub reads
    it: nothing launch.py imports may import huggingface_hub first."""
    code = "import sys, launch; print('huggingface_hub' in sys.modules)"
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_DIR, capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "False"
