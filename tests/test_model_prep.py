"""What `start` sends another host to check and fetch the model, and how its answers read."""

from __future__ import annotations

from ringserve.cluster.model_prep import request_for
from ringserve.config.settings import HostSpec, load_settings
from ringserve.model.prepare import Failure, Prepared, ProgressLine, parse_line
from tests.ring import PROJECT_DIR


def test_a_host_gets_the_settings_and_hub_variables_but_never_the_api_key() -> None:
    settings = load_settings(
        PROJECT_DIR / "absent.env",
        {"RINGSERVE_MODEL": "org/m", "RINGSERVE_API_KEY": "secret", "RINGSERVE_LOCAL_RANKS": "2"},
    )
    environ = {"HF_TOKEN": "hf_x", "HF_HOME": "/here", "HF_ENDPOINT": "", "PATH": "/bin"}
    spec = HostSpec(host="10.0.0.2", hf_home="/data/hf")
    request = request_for(spec, "me@10.0.0.2", settings, "fetch", environ)
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
