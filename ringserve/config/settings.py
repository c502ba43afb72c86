"""Typed settings: `.env` (python-dotenv) overridden by the environment, validated in one place."""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ringserve.errors import ConfigError

PREFIX = "RINGSERVE_"
KV_BITS = (0, 4, 8)  # what the prefix cache may quantize stored KV to (0: not at all)
KV_GROUP_SIZES = (32, 64, 128)  # the groups MLX quantizes in
PROJECT_DIR = Path(__file__).resolve().parents[2]
# The HTTP header the API answers with its run id, so `launch.py start` knows its own API.
RUN_HEADER = "x-ringserve-run"


class HostSpec(BaseModel):
    """One machine of the ring: how to reach it over SSH and what runs there."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(min_length=1, description="SSH address (name or IP)")
    user: str | None = None
    port: int = Field(default=22, ge=1, le=65535)
    key_file: str | None = None
    ips: tuple[str, ...] = Field(default=(), description="IPs the ring uses on this host")
    rdma: tuple[str | None, ...] | None = None
    ranks: int = Field(default=1, ge=1, le=64)
    workdir: str | None = None
    python: str | None = None
    hf_home: str | None = None  # HF_HOME there: where that host keeps its Hugging Face cache
    # How a hub model reaches the host: copied over SSH from the host that holds (or fetched)
    # it, or downloaded by the host itself (its own connection to the hub).
    fetch: Literal["copy", "hub"] = "copy"
    # Bytes this host's ranks may use for weights (RINGSERVE_MEMORY_BUDGET for this host): one
    # number for them together (each GPU's own on CUDA), or a list with one per rank here.
    memory_budget: int | tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _check_budget(self) -> HostSpec:
        budget = self.memory_budget
        if isinstance(budget, tuple) and len(budget) != self.ranks:
            raise ValueError(
                f"memory_budget lists {len(budget)} budgets for the host's {self.ranks} ranks"
            )
        values = budget if isinstance(budget, tuple) else (budget,) if budget is not None else ()
        if any(value < 1 for value in values):
            raise ValueError("memory_budget must be at least 1 byte")
        return self

    @property
    def ring_ips(self) -> tuple[str, ...]:
        return self.ips or (self.host,)


class Settings(BaseModel):
    """Every setting the project reads. Field names are the variables without `RINGSERVE_`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = ""
    # A hub model's branch, tag or commit; empty: main.
    model_revision: str = ""
    demo_size: Literal["tiny", "tiny-deep", "demo"] = "demo"
    # Run the Python file a model's config names as its architecture (`model_file`).
    trust_remote_code: bool = False
    models_dir: Path = PROJECT_DIR / ".ringserve" / "models"

    hosts: tuple[HostSpec, ...] = ()
    local_ranks: int = Field(default=2, ge=1, le=64)
    backend: Literal["ring", "jaccl", "nccl"] = "ring"
    launcher: Literal["direct", "mlx"] = "direct"
    # How the model is split: tensor (every rank an equal share of every layer), pipeline
    # (whole layers, in proportion to each rank's memory), auto (tensor when every rank has the
    # same memory and the model divides, pipeline otherwise).
    parallel: Literal["tensor", "pipeline", "auto"] = "auto"
    # A pipeline's layers per rank, rank 0 first (e.g. 5,3); empty: split by the ranks' memory.
    # `start` sets it for the ranks to the split it copied a hub model's files by.
    pipeline_split: tuple[int, ...] = ()
    ring_port: int = Field(default=32323, ge=1024, le=65000)
    pin_cpus: bool = True

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    api_key: str = ""  # one key, or several separated by commas
    # Keys that see every key's activity (/metrics; /model/info's queue, batch and prefix cache)
    # and may use the API like the others; one key, or several separated by commas.
    admin_key: str = ""
    # HTTP connections the API keeps open at once (fewer where the process may open fewer
    # files); one more takes the place of the longest idle one, or is answered 503.
    api_max_connections: int = Field(default=1000, ge=1)
    # Seconds a client has to send a request's headers, and its body (a second more per 64 KiB).
    api_read_timeout: float = Field(default=20.0, gt=0)
    run_dir: Path = PROJECT_DIR / ".ringserve" / "run"
    socket_path: Path | None = None

    default_max_tokens: int = Field(default=512, ge=1)
    max_tokens_limit: int = Field(default=8192, ge=1)
    context_limit: int = Field(default=0, ge=0)
    request_timeout: float = Field(default=600.0, gt=0)
    queue_size: int = Field(default=16, ge=1)
    # Responses (the Responses API) kept in memory for `previous_response_id`: at most this many
    # per key, and this many of all keys together (when full, the key that keeps the most loses
    # its least recently used one); 0 keeps none.
    responses_stored_per_key: int = Field(default=100, ge=0)
    responses_stored: int = Field(default=500, ge=0)
    # Whether /metrics answers without an API key (for a scraper on a private network).
    metrics_open: bool = False
    batch_size: int = Field(default=16, ge=1, le=256)
    prefill_chunk: int = Field(default=256, ge=16)
    heartbeat_timeout: float = Field(default=5.0, gt=0)
    # A model step's deadline follows what recent steps of its kind took, never below
    # step_timeout_min nor above step_timeout (the deadline of a kind of step not seen yet).
    step_timeout: float = Field(default=300.0, gt=0)
    step_timeout_min: float = Field(default=5.0, gt=0)
    # How long past its deadline a rank waits on the others before it leaves the ring (the
    # keeper then replaces the ring, as if a rank had died).
    frozen_timeout: float = Field(default=30.0, gt=0)
    # `start` leaves a keeper that restarts a ring that lost a rank (cluster/keeper.py).
    keeper: bool = True
    # Failures of a remote host (its rank died, SSH failed) within 10 minutes after which the
    # keeper leaves it out and splits the model over the remaining hosts.
    host_failure_limit: int = Field(default=2, ge=1)
    idle_max_sleep_ms: float = Field(default=50.0, ge=1, le=1000)
    start_timeout: float = Field(default=600.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # --- remote hosts (SSH, code push, remote ranks) ---
    ssh_trust_new_hosts: bool = False
    ssh_known_hosts: Path | None = None  # None: ~/.ssh/known_hosts
    ssh_connect_timeout: float = Field(default=10.0, gt=0)
    remote_workdir: str = Field(default="ringserve", min_length=1)  # HostSpec.workdir wins
    remote_python: str = Field(default="python3", min_length=1)  # HostSpec.python wins

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("hosts", mode="before")
    @classmethod
    def _parse_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            if not value.strip():
                return ()
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from exc
        return value

    @field_validator("pipeline_split", mode="before")
    @classmethod
    def _parse_split(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip().removeprefix("[").removesuffix("]")
            return tuple(part.strip() for part in text.split(",") if part.strip())
        return value

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"RINGSERVE_DEFAULT_MAX_TOKENS ({self.default_max_tokens}) exceeds "
                f"RINGSERVE_MAX_TOKENS_LIMIT ({self.max_tokens_limit})"
            )
        if self.pipeline_split and self.parallel == "tensor":
            raise ValueError(
                "RINGSERVE_PIPELINE_SPLIT splits the model into a pipeline; leave it empty with "
                "RINGSERVE_PARALLEL=tensor"
            )
        return self

    @property
    def api_keys(self) -> tuple[str, ...]:
        return _keys(self.api_key)

    @property
    def admin_keys(self) -> tuple[str, ...]:
        return _keys(self.admin_key)

    @property
    def auth_headers(self) -> dict[str, str]:
        """What launch.py itself sends to the API: the first admin key, else the first key."""
        keys = (*self.admin_keys, *self.api_keys)
        return {"Authorization": f"Bearer {keys[0]}"} if keys else {}

    @property
    def rank_socket(self) -> Path:
        return self.socket_path or self.run_dir / "rank0.sock"

    @property
    def world_size(self) -> int:
        return sum(h.ranks for h in self.hosts) if self.hosts else self.local_ranks

    # --- platform: memory check before loading, MLX build choice, CPU BLAS ---
    # Bytes a rank may use for weights; 0 means the memory the device really has free.
    memory_budget: int = Field(default=0, ge=0)
    # Read by scripts/pick_mlx_build.py (setup); declared here so `.env` may carry it.
    mlx_build: Literal["auto", "cpu", "cuda12", "cuda13", "metal"] = "auto"
    # Linux CPU build: compute with MKL (auto) or with the reference BLAS MLX bundles.
    cpu_blas: Literal["auto", "bundled"] = "auto"

    # --- prefix cache: KV reuse across requests, on every rank ---
    # Tokens of KV state each rank keeps (least recently used evicted first); 0 disables it.
    prefix_cache_tokens: int = Field(default=16384, ge=0)
    # Whether a prefix cached under one API key may be reused under another.
    prefix_cache_shared: bool = False
    # Bytes of entries each rank keeps on disk (least recently used removed first); 0: none.
    prefix_cache_disk_bytes: int = Field(default=8 << 30, ge=0)
    # Where they go (a directory per rank inside); None: `prefix-cache` in the run directory.
    prefix_cache_dir: Path | None = None
    # Stored KV quantized to these bits (0: as the model computes it), in groups of this size.
    kv_bits: int = 0
    kv_group_size: int = 64

    @field_validator("kv_bits")
    @classmethod
    def _check_kv_bits(cls, value: int) -> int:
        if value not in KV_BITS:
            raise ValueError(f"must be one of {', '.join(map(str, KV_BITS))}")
        return value

    @field_validator("kv_group_size")
    @classmethod
    def _check_kv_group_size(cls, value: int) -> int:
        if value not in KV_GROUP_SIZES:
            raise ValueError(f"must be one of {', '.join(map(str, KV_GROUP_SIZES))}")
        return value

    @property
    def prefix_cache_path(self) -> Path:
        return self.prefix_cache_dir or self.run_dir / "prefix-cache"


def exposure_warning(settings: Settings) -> str | None:
    """What a user should know when the API answers anyone who can reach it, without keys."""
    if settings.api_keys or settings.admin_keys or _loopback(settings.api_host):
        return None
    return (
        f"the API listens on {settings.api_host} without RINGSERVE_API_KEY: anyone who reaches "
        "it may use it, and every client shares one prefix cache, so one can learn another's "
        "prompts from cached_tokens and timing (give each client its own key, or send a "
        "cache_salt)"
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _keys(listed: str) -> tuple[str, ...]:
    return tuple(key.strip() for key in listed.split(",") if key.strip())


def _variable(field_name: str) -> str:
    return PREFIX + field_name.upper()


def _describe_error(error: Mapping[str, Any], raw: Mapping[str, str]) -> str:
    loc = [str(part) for part in error.get("loc", ())]
    if not loc:
        return str(error["msg"]).removeprefix("Value error, ")
    variable = _variable(loc[0])
    value = raw.get(variable, "")
    where = f"{variable}{''.join(f'[{p}]' for p in loc[1:])}"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}={value!r} is invalid: {message}"


def settings_env(settings: Settings) -> dict[str, str]:
    """The RINGSERVE_ variables that give another process (a remote rank) the same settings."""
    given = settings.model_dump(mode="json", include=settings.model_fields_set)
    return {
        _variable(name): value if isinstance(value, str) else json.dumps(value)
        for name, value in given.items()
    }


def load_settings(
    env_file: Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read `.env` then the environment; raise ConfigError naming every bad variable."""
    env_file = env_file if env_file is not None else PROJECT_DIR / ".env"
    environ = os.environ if environ is None else environ
    raw: dict[str, str] = {}
    if env_file.is_file():
        raw.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    raw.update({k: v for k, v in environ.items() if k.startswith(PREFIX)})

    known = {_variable(name): name for name in Settings.model_fields}
    unknown = sorted(k for k in raw if k.startswith(PREFIX) and k not in known)
    problems = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"{name} is not a setting{hint}")
    if problems:
        raise ConfigError("; ".join(problems))

    values = {known[k]: v for k, v in raw.items() if k in known and v != ""}
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        lines = [_describe_error(e, raw) for e in exc.errors()]
        raise ConfigError("; ".join(lines)) from None
