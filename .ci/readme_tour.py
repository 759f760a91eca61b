"""Run the README's API tour (its first ```python block after "## API tour") as a script.

Used by tests/test_readme.py and by .ci/run in a fresh venv with no extras installed, so
the README's first API lines are checked the way a new user meets them.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def tour_code(readme: Path) -> str:
    text = readme.read_text()
    section = text.split("## API tour", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    if match is None:
        raise SystemExit(f"{readme}: no python block in the API tour")
    return match.group(1)


if __name__ == "__main__":
    readme = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "README.md"
    exec(compile(tour_code(readme), f"{readme}:API tour", "exec"), {"__name__": "__tour__"})
    print("README API tour: ok")
