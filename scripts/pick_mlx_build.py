"""Print the pyproject extra naming the MLX build for this machine (RINGSERVE_MLX_BUILD overrides).

    pick_mlx_build.py                   the build to install
    pick_mlx_build.py --stale BUILD     the MLX packages to uninstall first, when another build
                                        is installed for the Python that runs this

Runs with the system Python before the virtual environment exists; the decision lives in
ringserve/platform/mlx_build.py, which uses the standard library only.
"""

import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

from ringserve.platform.mlx_build import (  # noqa: E402
    BuildChoiceError,
    installed_packages,
    packages_to_remove,
    pick_build_for_project,
)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--stale"] and len(argv) == 2:
        print(" ".join(packages_to_remove(argv[1], installed_packages())))
        return 0
    try:
        print(pick_build_for_project(PROJECT_DIR))
    except BuildChoiceError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
