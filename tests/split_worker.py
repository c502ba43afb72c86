"""One rank of a test ring that serves a list of models in turn, each split as asked, and answers
a few prompts greedily with the engine every rank of a real ring runs (`load_split_model`, then
`BatchEngine` with its prefix cache), every rank applying the same admissions and steps.

Started by tests/split_ring.py on every rank of a real MLX group (ring backend on loopback).
Rank 0 writes, per model, the answers' token ids, or the refusal the loading raised.

    python -m tests.split_worker JOBS.json RESULTS.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generation_stream

from ringserve.distributed.loading import join_group, load_split_model
from ringserve.distributed.ops import GenerateOp
from ringserve.distributed.protocol import FinishCode
from ringserve.engine.batch import BatchEngine, BatchLimits
from ringserve.engine.prefix_cache import PrefixCache
from ringserve.errors import RingserveError
from ringserve.ipc.messages import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def generate(
    engine: BatchEngine, prompts: list[list[int]], max_tokens: int, base: int
) -> tuple[list[list[int]], int]:
    """Answers to `prompts` decoded together, each exactly `max_tokens` long, and how many
    prompt tokens the prefix cache supplied."""
    answers: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    reused = 0
    for i, tokens in enumerate(prompts):
        op = GenerateOp(
            request_id=base + i,
            tokens=tuple(tokens),
            sampling=GREEDY,
            seed=0,
            max_tokens=max_tokens,
        )
        reused += engine.admit(op)
    running = set(answers)
    while running:
        for taken in engine.step().tokens:
            index = taken.request_id - base
            answers[index].append(taken.token)
            if len(answers[index]) == max_tokens:  # as rank 0 ends a request at its length
                engine.remove(taken.request_id, FinishCode.LENGTH)
                running.discard(index)
    return [answers[i] for i in range(len(prompts))], reused


def serve_job(group: mx.distributed.Group, job: dict[str, Any]) -> dict[str, Any]:
    try:
        model, _, _, plan = load_split_model(job["path"], group, job["parallel"], job["budgets"])
    except RingserveError as exc:
        return {"refused": str(exc)}
    prefix_cache = PrefixCache(model, budget_tokens=4096)
    engine = BatchEngine(model, prefix_cache, None, BatchLimits(8, 16), stream=generation_stream)
    prompts: list[list[int]] = job["prompts"]
    cold, _ = generate(engine, prompts, job["max_tokens"], base=1)
    # The first answer continued: its turn comes from the prefix cache.
    follow_up = [prompts[0] + cold[0] + job["follow_up"]]
    warm, reused = generate(engine, follow_up, job["max_tokens"], base=100)
    split = plan.pipeline.split if plan.pipeline is not None else None
    return {"layout": plan.layout, "split": split, "answers": cold + warm, "reused": reused}


def main(jobs_file: str, results_file: str) -> int:
    jobs = json.loads(Path(jobs_file).read_text())
    group = join_group("ring", int(jobs["world_size"]))
    results = {}
    for job in jobs["jobs"]:
        started = time.monotonic()
        results[job["name"]] = serve_job(group, job)
        results[job["name"]]["seconds"] = round(time.monotonic() - started, 2)
    if group.rank() == 0:
        Path(results_file).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
