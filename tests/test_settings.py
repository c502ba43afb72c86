"""Settings come from .env and the environment, and every mistake names its variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ringserve.config.settings import Settings, exposure_warning, load_settings
from ringserve.errors import ConfigError

NO_FILE = Path("/nonexistent/.env")


def test_defaults_need_no_file() -> None:
    settings = load_settings(NO_FILE, {})
    assert settings.world_size == 2
    assert settings.api_host == "127.0.0.1"
    assert settings.rank_socket == settings.run_dir / "rank0.sock"


def test_the_environment_overrides_the_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("RINGSERVE_API_PORT=9000\nRINGSERVE_LOCAL_RANKS=4\n")
    settings = load_settings(env_file, {"RINGSERVE_API_PORT": "9100"})
    assert settings.api_port == 9100
    assert settings.local_ranks == 4


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"RINGSERVE_API_PORT": "abc"}, "RINGSERVE_API_PORT='abc' is invalid"),
        ({"RINGSERVE_API_PORT": "70000"}, "less than or equal to 65535"),
        ({"RINGSERVE_BACKEND": "tcp"}, "RINGSERVE_BACKEND='tcp' is invalid: Input should be"),
        (
            {"RINGSERVE_MODLE": "x"},
            "RINGSERVE_MODLE is not a setting (did you mean RINGSERVE_MODEL?)",
        ),
        ({"RINGSERVE_HOSTS": "[oops"}, "RINGSERVE_HOSTS='[oops' is invalid: not valid JSON"),
        ({"RINGSERVE_HOSTS": '[{"host": "a", "ranks": 0}]'}, "RINGSERVE_HOSTS[0][ranks]"),
        (
            {"RINGSERVE_DEFAULT_MAX_TOKENS": "100", "RINGSERVE_MAX_TOKENS_LIMIT": "10"},
            "RINGSERVE_DEFAULT_MAX_TOKENS (100) exceeds RINGSERVE_MAX_TOKENS_LIMIT (10)",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(
    environ: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(NO_FILE, environ)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_hosts_parse_from_json() -> None:
    hosts = '[{"host": "10.0.0.1", "ranks": 2}, {"host": "10.0.0.2", "user": "me"}]'
    settings = load_settings(NO_FILE, {"RINGSERVE_HOSTS": hosts})
    assert settings.world_size == 3
    assert settings.hosts[1].user == "me"
    assert settings.hosts[1].ring_ips == ("10.0.0.2",)


def test_env_example_documents_every_setting_and_loads_as_is(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / ".env.example"
    named = set(re.findall(r"^#? ?(RINGSERVE_[A-Z0-9_]+)=", example.read_text(), re.MULTILINE))
    expected = {f"RINGSERVE_{name.upper()}" for name in Settings.model_fields}
    assert named == expected
    load_settings(example, {})  # every value it sets is valid


@pytest.mark.parametrize(
    ("environ", "warned"),
    [
        ({}, False),
        ({"RINGSERVE_API_HOST": "0.0.0.0"}, True),
        ({"RINGSERVE_API_HOST": "::"}, True),
        ({"RINGSERVE_API_HOST": "::1"}, False),
        ({"RINGSERVE_API_HOST": "localhost"}, False),
        ({"RINGSERVE_API_HOST": "10.0.0.2", "RINGSERVE_API_KEY": "k"}, False),
        ({"RINGSERVE_API_HOST": "10.0.0.2", "RINGSERVE_ADMIN_KEY": "k"}, False),
    ],
)
def test_an_api_open_beyond_loopback_without_keys_is_said_at_start(
    environ: dict[str, str], warned: bool
) -> None:
    warning = exposure_warning(load_settings(NO_FILE, environ))
    assert (warning is not None) == warned
    if warning is not None:
        assert "prefix cache" in warning and "cache_salt" in warning


def test_launch_speaks_to_the_api_with_an_admin_key_first() -> None:
    settings = load_settings(NO_FILE, {"RINGSERVE_API_KEY": "a,b", "RINGSERVE_ADMIN_KEY": "ops"})
    assert settings.auth_headers == {"Authorization": "Bearer ops"}
    assert settings.api_keys == ("a", "b") and settings.admin_keys == ("ops",)


def test_kv_quantization_takes_the_bits_and_groups_mlx_has() -> None:
    settings = load_settings(NO_FILE, {"RINGSERVE_KV_BITS": "4", "RINGSERVE_KV_GROUP_SIZE": "32"})
    assert (settings.kv_bits, settings.kv_group_size) == (4, 32)
    with pytest.raises(
        ConfigError, match="RINGSERVE_KV_BITS='3' is invalid: must be one of 0, 4, 8"
    ):
        load_settings(NO_FILE, {"RINGSERVE_KV_BITS": "3"})
    with pytest.raises(ConfigError, match="RINGSERVE_KV_GROUP_SIZE='16' is invalid"):
        load_settings(NO_FILE, {"RINGSERVE_KV_GROUP_SIZE": "16"})


def test_the_prefix_cache_stays_in_the_run_directory_unless_told_otherwise() -> None:
    settings = load_settings(NO_FILE, {"RINGSERVE_RUN_DIR": "/srv/run"})
    assert settings.prefix_cache_path == Path("/srv/run/prefix-cache")
    moved = load_settings(NO_FILE, {"RINGSERVE_PREFIX_CACHE_DIR": "/data/kv"})
    assert moved.prefix_cache_path == Path("/data/kv")
