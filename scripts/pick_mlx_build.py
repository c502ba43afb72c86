"""Print the pyproject extra naming the MLX build for this machine (RINGSERVE_MLX_BUILD overrides).

Runs with the system Python before the virtual environment exists; the decision lives in
ringserve/telemetry/mlx_build.py, which uses the standard library only.
"""

import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

from ringserve.telemetry.mlx_build import BuildChoiceError, pick_build_for_project  # noqa: E402


def main() -> int:
    try:
        print(pick_build_for_project(PROJECT_DIR))
    except BuildChoiceError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
