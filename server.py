"""One rank of the ring: ready the process for its platform, then run `ringserve.rank`.

The order matters, so this file imports nothing of MLX at module level:
1. CUDA: the NVIDIA wheels' libraries must be on LD_LIBRARY_PATH when the process starts, so a
   rank that lacks them restarts itself once with them (same PID, same argv). Metal:
   MLX_METAL_FAST_SYNCH is set here, before MLX initialises Metal (no restart needed).
2. A rank that shares its host with other ranks keeps to its own slice of the CPUs, set
   before MLX starts any thread (threads inherit it). On Linux with MLX's CPU build, MKL is
   loaded for MLX to call instead of its bundled reference BLAS, with a thread per CPU of the
   slice; this too must come before MLX is imported.
3. The MLX shims go in before anything imports `mlx_lm.generate`, which calls
   `mx.new_thread_local_stream` at import; some CUDA builds lack it.
4. The platform is detected, and a GPU MLX cannot use falls back to the CPU, before
   `mlx_lm.generate` creates its stream on the default device.
"""

from __future__ import annotations

import logging
import os
import sys

from ringserve.config.settings import load_settings
from ringserve.errors import RingserveError
from ringserve.ipc.keeper_report import cannot_serve_line
from ringserve.logs import setup_logging
from ringserve.platform.blas import load_cpu_blas, log_cpu_blas, rank_blas_threads
from ringserve.platform.cpu_share import pin_to_cpu_share
from ringserve.platform.process_env import (
    RELAUNCH_MARKER,
    prepare_process_environment,
    require_mlx,
)

log = logging.getLogger("ringserve.server")


def main() -> int:
    prepare_process_environment()
    pinning = pin_to_cpu_share(os.environ)
    try:
        settings = load_settings()
    except RingserveError as exc:
        print(f"ringserve: {exc}", file=sys.stderr)
        return exc.exit_code
    setup_logging(settings.log_level, f"rank{os.environ.get('MLX_RANK', '0')}")
    if os.environ.get(RELAUNCH_MARKER):
        log.info("restarted with the NVIDIA wheels' libraries on LD_LIBRARY_PATH")
    if pinning.note:
        log.info("%s", pinning.note)
    blas_threads = rank_blas_threads(settings, pinning.own_cpus)
    blas_problem = load_cpu_blas(settings.cpu_blas, blas_threads)

    try:
        require_mlx()
        from ringserve.platform.device import current_platform, install_mlx_shims, use_device

        install_mlx_shims()
        platform = current_platform()
        use_device(platform)
        log_cpu_blas(settings.cpu_blas, blas_problem)

        from ringserve.rank import serve

        serve(settings, platform)
    except RingserveError as exc:
        log.error("%s", cannot_serve_line(os.getpid(), str(exc)))
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
