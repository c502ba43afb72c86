"""Ranks that share a host each keep to their own slice of its CPUs.

MLX's ring transport spins on a core while it waits for a peer. Ranks left free to run on
any core steal each other's cores then, and on a small host an idle exchange costs several
times the CPU it costs with each rank on its own cores (bench/RESULTS.md).

The launcher names the slice (`_RINGSERVE_CPU_SLICE=index/count`, index among the ranks on
that host); the rank cuts it from the CPUs it may use, whole cores together, and applies it
before it starts any thread, so that every thread MLX starts later inherits it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

# Not RINGSERVE_-prefixed: settings refuse unknown RINGSERVE_ variables, and this one is set by
# the launcher for one rank, not by users.
CPU_SLICE_VAR = "_RINGSERVE_CPU_SLICE"
SYSFS_CPUS = Path("/sys/devices/system/cpu")


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


def cpu_share(
    cpus: Sequence[int],
    index: int,
    count: int,
    cores: Mapping[int, tuple[int, int]] | None = None,
) -> list[int] | None:
    """Rank `index` of `count` gets an equal share of `cpus`; None when there are fewer CPUs
    than ranks (no share to give) or a single rank (nothing to share with).

    `cores` maps a CPU to its (package, core): hyperthreads of one core sit side by side in the
    order shares are cut from, so a rank gets whole cores rather than one thread of each core
    (Linux numbers a core's second thread after all the first ones)."""
    cores = cores or {}
    ordered = sorted(set(cpus), key=lambda cpu: (*cores.get(cpu, (0, cpu)), cpu))
    if count <= 1 or len(ordered) < count:
        return None
    share = ordered[index * len(ordered) // count : (index + 1) * len(ordered) // count]
    return sorted(share)


def cpu_cores(cpus: Sequence[int], sysfs: Path = SYSFS_CPUS) -> dict[int, tuple[int, int]]:
    """Each CPU's (physical package, core id) from sysfs; CPUs it does not describe are left out."""
    found = {}
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            package = int((topology / "physical_package_id").read_text())
            core = int((topology / "core_id").read_text())
        except (OSError, ValueError):
            continue
        found[cpu] = (package, core)
    return found


def describe_cpus(cpus: Sequence[int]) -> str:
    """`[0, 1, 2, 5]` -> "0-2,5", as Linux writes CPU lists."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][-1] + 1:
            runs[-1].append(cpu)
        else:
            runs.append([cpu])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


class Pinning(NamedTuple):
    note: str | None  # what was done, for the log
    own_cpus: bool  # the process now runs on CPUs no other rank of this host runs on


def pin_to_cpu_share(environ: Mapping[str, str]) -> Pinning:
    """Restrict this process to its slice of the CPUs it may use; says what was done, if anything.

    Call it before anything starts a thread: on Linux the affinity set here belongs to the
    calling thread, and only threads it starts afterwards inherit it.
    """
    value = environ.get(CPU_SLICE_VAR)
    if not value or not hasattr(os, "sched_setaffinity"):
        return Pinning(None, own_cpus=False)
    index, count = parse_cpu_slice(value)
    allowed = sorted(os.sched_getaffinity(0))
    share = cpu_share(allowed, index, count, cpu_cores(allowed))
    if share is None:
        note = (
            f"not pinned: {len(allowed)} CPU(s) for {count} ranks on this host, "
            "too few to give each rank its own"
        )
        return Pinning(note, own_cpus=False)
    os.sched_setaffinity(0, share)
    note = (
        f"pinned to CPUs {describe_cpus(share)} of {describe_cpus(allowed)} "
        f"(local rank {index} of {count} on this host)"
    )
    return Pinning(note, own_cpus=True)
