"""Regenerate docs/cli.md from the argument parser:  python scripts/gen_cli_docs.py [--check]"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def render() -> str:
    os.environ["COLUMNS"] = "110"
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from kappatune.cli import parser_with_commands

    p, commands = parser_with_commands()
    parts = ["# CLI reference\n\nGenerated from the parser (`python scripts/gen_cli_docs.py`; "
             "`kappatune COMMAND --help` shows the same).\n", "## kappatune\n\n```\n" + p.format_help() + "```\n"]
    for name, sp in commands.items():
        parts.append(f"## kappatune {name}\n\n```\n" + sp.format_help() + "```\n")
    return "\n".join(parts)


def main() -> int:
    path = os.path.join(ROOT, "docs", "cli.md")
    text = render()
    if "--check" in sys.argv:
        with open(path, encoding="utf-8") as f:
            if f.read() != text:
                print("docs/cli.md is out of date: python scripts/gen_cli_docs.py", file=sys.stderr)
                return 1
        return 0
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
