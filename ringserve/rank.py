"""One rank of the ring. Every rank runs this; rank 0 also listens on the Unix socket.

Started by `server.py`, which readies the process for its platform first (see there).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.generate import generation_stream
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ringserve.config.settings import Settings
from ringserve.distributed.idle import IdleBackoff
from ringserve.distributed.layout import rank_budgets
from ringserve.distributed.loading import (
    LayoutPlan,
    gather_memory,
    join_group,
    load_split_model,
)
from ringserve.distributed.protocol import Collectives
from ringserve.engine.batch import BatchEngine, BatchLimits
from ringserve.engine.health import Health, HealthLimits
from ringserve.engine.leader import Leader
from ringserve.engine.logprobs import token_texts
from ringserve.engine.loop import RankLoop, RankLost
from ringserve.engine.prefix_start import Placement, open_prefix_cache
from ringserve.engine.prompts import Limits, PromptBuilder, longest_token_bytes
from ringserve.engine.ring_exit import RingExit
from ringserve.engine.service import RankService
from ringserve.engine.structure import Grammars
from ringserve.engine.telemetry_op import rank_report
from ringserve.ipc.messages import ClusterInfo, RankShare
from ringserve.ipc.rank_server import EXTRA_CONNECTIONS, RankSocketServer, claim_socket_path
from ringserve.model.paths import resolve_model, served_model_id
from ringserve.model.source import quantization
from ringserve.platform.device import PlatformInfo, apply_wired_limit
from ringserve.platform.preflight import (
    check_backend_environment,
    check_backend_platform,
    check_rank_memory,
    own_memory,
)
from ringserve.telemetry.memory import model_weight_bytes, rank_share_bytes

log = logging.getLogger("ringserve.rank")
DEFAULT_CONTEXT = 4096


def serve(settings: Settings, platform: PlatformInfo) -> None:
    host_name = socket.gethostname()
    check_backend_platform(settings.backend, settings.world_size, platform, host_name)
    check_backend_environment(settings.backend, settings.world_size, os.environ)
    model_path = str(resolve_model(settings))
    single = settings.world_size == 1
    if settings.parallel == "tensor" or single:
        check_rank_memory(settings, model_path, platform, host_name)
    apply_wired_limit(platform)
    group = join_group(settings.backend, settings.world_size)
    rank = group.rank()
    if rank == 0:
        claim_socket_path(settings.rank_socket)  # before the long load: fail fast
    # The layout needs every rank's memory: each tells the others its own.
    budgets = None
    if not single and settings.parallel != "tensor":
        budgets = rank_budgets(settings, gather_memory(group, own_memory(settings, platform)))
    health = Health(health_limits(settings))
    socket_server: RankSocketServer | None = None
    leader: Leader | None = None
    model, tokenizer, config, plan = load_split_model(
        model_path,
        group,
        settings.parallel,
        budgets,
        settings.trust_remote_code,
        check_tensor_memory=lambda: check_rank_memory(settings, model_path, platform, host_name),
        pinned_split=settings.pipeline_split,
    )
    layout = plan.layout
    peak_after_load = mx.get_peak_memory()
    context_limit = settings.context_limit or int(
        config.get("max_position_embeddings") or DEFAULT_CONTEXT
    )
    # Every rank holds every layer's cache (a pipeline's other layers keep placeholders), so
    # every rank decides reuse and eviction alike, whatever the layout.
    prefix_cache = open_prefix_cache(
        settings,
        model,
        group,
        generation_stream,
        Placement(
            model_path=model_path,
            revision=settings.model_revision,
            layout=layout,
            split=plan.pipeline.split if plan.pipeline else (),
            ranks=group.size(),
            rank=rank,
        ),
    )
    vocab_size = _vocab_size(config, tokenizer)
    grammars = Grammars(tokenizer)
    if rank == 0:
        texts = token_texts(tokenizer)
        leader = Leader(tokenizer, settings.queue_size, settings.batch_size, health, texts)
        limits = Limits(
            context_limit=context_limit,
            default_max_tokens=settings.default_max_tokens,
            max_tokens_limit=settings.max_tokens_limit,
            vocab_size=vocab_size,
            max_token_bytes=longest_token_bytes(texts),
        )
        facts = ClusterInfo(
            model=served_model_id(settings, model_path),
            model_path=model_path,
            ranks=group.size(),
            backend=settings.backend if group.size() > 1 else "single",
            context_limit=context_limit,
            quantization=quantization(config),
            dtype=_weights_dtype(model),
            parameters=plan.parameters,
            parallel=layout,
            split=_split_info(plan, budgets, model_path, group.size()),
            max_request_bytes=limits.max_request_bytes,
            ready=False,
        )
        service = RankService(
            facts, PromptBuilder(tokenizer, limits, grammars), leader, health, prefix_cache
        )
        socket_server = RankSocketServer(
            settings.rank_socket,
            service,
            settings.queue_size + settings.batch_size + EXTRA_CONNECTIONS,
        )
        socket_server.start()
    batch = BatchEngine(
        model,
        prefix_cache,
        grammars,
        BatchLimits(settings.batch_size, settings.prefill_chunk),
        stream=generation_stream,
        on_prefill_chunk=health.progress,
    )
    loop = RankLoop(
        Collectives(group, generation_stream, token_slots=settings.batch_size),
        batch,
        telemetry=lambda: rank_report(
            rank,
            extra={
                "prefix_cache": prefix_cache.stats(),
                "prefix_cache_bytes": prefix_cache.usage(),
                "model_memory": _model_memory(peak_after_load),
            },
        ),
        health=health,
        leader=leader,
        idle=IdleBackoff(max_s=settings.idle_max_sleep_ms / 1000),
    )

    def request_shutdown(signum: int, frame: FrameType | None) -> None:
        loop.shutdown_requested = True

    signal.signal(signal.SIGTERM, request_shutdown)
    ring_exit = RingExit(health, leader, socket_server)
    ring_exit.watch()
    try:
        loop.warm_up()
        health.loaded = True
        log.info("rank %d of %d ready", rank, group.size())
        loop.run()
    except RankLost as exc:
        ring_exit.leave(f"lost contact with the other ranks ({exc})")
    finally:
        if socket_server is not None:
            socket_server.close()
        prefix_cache.close()


def health_limits(settings: Settings) -> HealthLimits:
    return HealthLimits(
        heartbeat=settings.heartbeat_timeout,
        step_min=settings.step_timeout_min,
        step_max=settings.step_timeout,
        frozen=settings.frozen_timeout,
    )


def _model_memory(peak_after_load: int) -> dict[str, int]:
    """Bytes MLX holds now (this rank's weights, KV caches), held at most while loading and
    since, and the process's peak resident memory."""
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "mlx_active": mx.get_active_memory(),
        "mlx_peak_load": peak_after_load,
        "mlx_peak": mx.get_peak_memory(),
        "peak_rss": peak_rss if sys.platform == "darwin" else peak_rss * 1024,
    }


def _split_info(
    plan: LayoutPlan, budgets: list[int] | None, model_path: str, ranks: int
) -> tuple[RankShare, ...]:
    """Per rank: the layers it runs and the weight bytes it holds."""
    pipeline = plan.pipeline
    if pipeline is None:
        if plan.layout != "tensor" or not os.path.isdir(model_path):
            return ()
        config = json.loads((Path(model_path) / "config.json").read_text())
        n_layers = int(config.get("text_config", config)["num_hidden_layers"])
        share = rank_share_bytes(model_weight_bytes(Path(model_path)), ranks)
        return tuple(
            RankShare(
                rank=rank,
                layers=(0, n_layers),
                weight_bytes=share,
                memory_budget=budgets[rank] if budgets else 0,
            )
            for rank in range(ranks)
        )
    return tuple(
        RankShare(
            rank=rank,
            layers=(layers.start, layers.stop),
            weight_bytes=pipeline.weight_bytes[rank],
            memory_budget=budgets[rank] if budgets else 0,
        )
        for rank, layers in enumerate(pipeline.layers)
    )


def _vocab_size(config: dict[str, Any], tokenizer: TokenizerWrapper) -> int:
    """How many token ids the model's logits cover."""
    text_config = config.get("text_config", config)
    return int(text_config.get("vocab_size") or config.get("vocab_size") or len(tokenizer))


def _weights_dtype(model: nn.Module) -> str:
    weights = tree_flatten(model.parameters())
    dtypes = {str(v.dtype).removeprefix("mlx.core.") for _, v in weights}  # type: ignore[union-attr,str-unpack]
    return ",".join(sorted(dtypes))
