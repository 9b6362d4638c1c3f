"""Figures quoted in more than one document live once, in docs/figures.json; every quote is marked
``<!--fig:NAME-->VALUE<!--/fig-->`` (the comments do not render). This rewrites every marked VALUE from the
JSON; ``--check`` only reports stale or unknown quotes and exits 1 (the test suite runs the check).

    python scripts/sync_figures.py [--check]
"""

from __future__ import annotations

import json
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
MARK = re.compile(r"<!--fig:([a-z0-9_]+)-->(.*?)<!--/fig-->")


def documents() -> list[str]:
    docs = os.path.join(ROOT, "docs")
    return [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))


def problems(figures: dict[str, str]) -> list[str]:
    """Stale quotes, quotes of unknown figures, and figures nobody quotes."""
    out, used = [], set()
    for path in documents():
        with open(path, encoding="utf-8") as f:
            for name, value in MARK.findall(f.read()):
                used.add(name)
                if name not in figures:
                    out.append(f"{os.path.relpath(path, ROOT)}: unknown figure {name!r}")
                elif value != figures[name]:
                    out.append(f"{os.path.relpath(path, ROOT)}: {name} is {value!r}, docs/figures.json says "
                               f"{figures[name]!r}")
    out += [f"docs/figures.json: {name} is quoted nowhere" for name in sorted(set(figures) - used)]
    return out


def sync(figures: dict[str, str]) -> None:
    for path in documents():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = MARK.sub(lambda m: f"<!--fig:{m[1]}-->{figures.get(m[1], m[2])}<!--/fig-->", text)
        if new != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)


def main() -> int:
    with open(os.path.join(ROOT, "docs", "figures.json"), encoding="utf-8") as f:
        figures = json.load(f)
    if "--check" not in sys.argv:
        sync(figures)
    found = problems(figures)
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
