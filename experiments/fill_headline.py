"""Write the output of experiments/headline.py between the headline markers of README.md and
docs/results.md, so the tables there are always the generated ones."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- headline:start -->", "<!-- headline:end -->"


def main() -> int:
    tables = subprocess.run([sys.executable, str(ROOT / "experiments/headline.py")], check=True,
                            capture_output=True, text=True).stdout
    for path in (ROOT / "README.md", ROOT / "docs/results.md"):
        text = path.read_text()
        head, _, rest = text.partition(START)
        _, _, tail = rest.partition(END)
        if not rest:
            raise SystemExit(f"{path}: no {START} marker")
        path.write_text(f"{head}{START}\n{tables}{END}{tail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
