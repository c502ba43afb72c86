"""Print the pyproject extra naming the MLX build for this machine (RINGSERVE_MLX_BUILD overrides)."""

import os
import platform
import sys

CHOICES = ("cpu", "cuda12", "cuda13", "metal")


def pick() -> str:
    forced = os.environ.get("RINGSERVE_MLX_BUILD", "").strip().lower()
    if forced and forced != "auto":
        if forced not in CHOICES:
            sys.exit(f"RINGSERVE_MLX_BUILD={forced!r} is invalid: use auto or one of {CHOICES}")
        return forced
    if platform.system() == "Darwin":
        return "metal"
    return "cpu"


if __name__ == "__main__":
    print(pick())
