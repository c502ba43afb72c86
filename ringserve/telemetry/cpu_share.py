"""Ranks that share a host each keep to their own slice of its CPUs.

MLX's ring transport spins on a core while it waits for a peer. Ranks left free to run on
any core steal each other's cores then, and on a small host an idle exchange costs several
times the CPU it costs with each rank on its own cores (bench/RESULTS.md).

The launcher names the slice (`_RINGSERVE_CPU_SLICE=index/count`, index among the ranks on
that host); the rank applies it before it starts any thread, so that every thread MLX starts
later inherits it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

# Not RINGSERVE_-prefixed: settings refuse unknown RINGSERVE_ variables, and this one is set by
# the launcher for one rank, not by users.
CPU_SLICE_VAR = "_RINGSERVE_CPU_SLICE"


def cpu_slice_value(index: int, count: int) -> str:
    return f"{index}/{count}"


def parse_cpu_slice(value: str) -> tuple[int, int]:
    index_text, sep, count_text = value.partition("/")
    if not sep or not index_text.isdigit() or not count_text.isdigit():
        raise ValueError(f"{CPU_SLICE_VAR}={value!r} is not INDEX/COUNT")
    index, count = int(index_text), int(count_text)
    if not 0 <= index < count:
        raise ValueError(f"{CPU_SLICE_VAR}={value!r}: index must be below count")
    return index, count


def cpu_share(cpus: Sequence[int], index: int, count: int) -> list[int] | None:
    """Rank `index` of `count` gets a contiguous, equal share of `cpus`; None when there are
    fewer CPUs than ranks (no share to give) or a single rank (nothing to share with)."""
    ordered = sorted(set(cpus))
    if count <= 1 or len(ordered) < count:
        return None
    return ordered[index * len(ordered) // count : (index + 1) * len(ordered) // count]


def describe_cpus(cpus: Sequence[int]) -> str:
    """`[0, 1, 2, 5]` -> "0-2,5", as Linux writes CPU lists."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][-1] + 1:
            runs[-1].append(cpu)
        else:
            runs.append([cpu])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def pin_to_cpu_share(environ: Mapping[str, str]) -> str | None:
    """Restrict this process to its slice of the CPUs it may use; says what was done, if anything.

    Call it before anything starts a thread: on Linux the affinity set here belongs to the
    calling thread, and only threads it starts afterwards inherit it.
    """
    value = environ.get(CPU_SLICE_VAR)
    if not value or not hasattr(os, "sched_setaffinity"):
        return None
    index, count = parse_cpu_slice(value)
    allowed = sorted(os.sched_getaffinity(0))
    share = cpu_share(allowed, index, count)
    if share is None:
        return (
            f"not pinned: {len(allowed)} CPU(s) for {count} ranks on this host, "
            "too few to give each rank its own"
        )
    os.sched_setaffinity(0, share)
    return (
        f"pinned to CPUs {describe_cpus(share)} of {describe_cpus(allowed)} "
        f"(local rank {index} of {count} on this host)"
    )
