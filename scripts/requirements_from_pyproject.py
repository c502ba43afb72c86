"""Print pyproject.toml's dependencies plus the named extras, one requirement a line."""

import sys
import tomllib
from pathlib import Path

data = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
project = data["project"]
lines = list(project["dependencies"])
for extra in filter(None, (sys.argv[1] if len(sys.argv) > 1 else "").split(",")):
    lines += project["optional-dependencies"][extra]
print("\n".join(lines))
