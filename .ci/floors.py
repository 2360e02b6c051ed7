"""Print a pip constraints file pinning the ML stack to the lower bounds pyproject.toml declares.

CI installs a second environment with it and runs the training, template and packing tests there, so every
declared floor is one the tests have run at (not only the newest releases the main environment resolves).
"""

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

STACK = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")


def floors(pyproject: Path) -> dict[str, str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    found = {}
    for dep in deps:
        m = re.match(r"([A-Za-z0-9_.-]+)\s*(?:\[[^]]*\])?\s*([^;]*)", dep)
        name, spec = m.group(1).lower(), m.group(2)
        low = re.search(r">=\s*([0-9][^,\s]*)", spec)
        if name in STACK:
            if not low:
                sys.exit(f"pyproject.toml: {dep!r} declares no lower bound")
            found[name] = low.group(1)
    missing = set(STACK) - set(found)
    if missing:
        sys.exit(f"pyproject.toml: no dependency on {sorted(missing)}")
    return found


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    print("\n".join(f"{name}=={version}" for name, version in floors(root / "pyproject.toml").items()))
