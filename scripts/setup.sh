#!/usr/bin/env bash
# Creates the project's .venv and installs ringserve's dependencies into it.
# Usage: scripts/setup.sh [--test]   (--test adds the test tools and sshd for the SSH tests)
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=.venv
stamp=$venv/.ringserve-installed

want_test=0
[[ ${1:-} == --test ]] && want_test=1

mlx_extra=$("$python" scripts/pick_mlx_build.py)
inputs="$(cat pyproject.toml) extra=$mlx_extra test=$want_test"
if [[ -f $stamp && "$(cat "$stamp")" == "$inputs" ]]; then
    exit 0
fi

[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
echo "ringserve: installing dependencies into $venv (MLX build: $mlx_extra)" >&2
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
stale=$("$venv/bin/python" scripts/pick_mlx_build.py --stale "$mlx_extra")
if [[ -n $stale ]]; then
    # Every MLX build installs the same library file: remove the old build before this one.
    echo "ringserve: removing the MLX build installed before ($stale)" >&2
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip uninstall -q -y $stale
fi
extras=$mlx_extra
[[ $want_test == 1 ]] && extras="$extras,test"
"$venv/bin/python" -m pip install -q -r <("$venv/bin/python" scripts/requirements_from_pyproject.py "$extras")
printf '%s' "$inputs" >"$stamp"
