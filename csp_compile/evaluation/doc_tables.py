"""Results tables in the docs, generated from the committed JSON so that a table cannot drift from it.

A block ``<!-- table: eval FILE window=W metric=M -->`` ... ``<!-- /table -->`` in a markdown file
is replaced by ``real_accuracy_markdown`` of FILE's records (a real-model eval), a block
``<!-- table: task FILE metric=M -->`` by ``task_accuracy_markdown`` (a shipped-task eval); paths
relative to the repository root. ``python -m csp_compile.evaluation.doc_tables README.md docs/real_weights.md`` rewrites
the blocks in place; a test checks that every block already equals what it would write.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from csp_compile.evaluation.report import real_accuracy_markdown, task_accuracy_markdown

__all__ = ["render"]

_BLOCK = re.compile(r"(<!-- table: (?P<kind>eval|task) (?P<file>\S+)(?: window=(?P<window>\d+))? metric=(?P<metric>\w+) -->\n)"
                    r"(?P<body>.*?)(?P<end><!-- /table -->)", re.S)


def render(text: str, root: Path) -> str:
    """``text`` with every table block regenerated from its JSON file under ``root``."""
    def table(match: re.Match) -> str:
        records = json.loads((root / match["file"]).read_text())["records"]
        if match["kind"] == "task":
            body = task_accuracy_markdown(records, match["metric"])
        else:
            body = real_accuracy_markdown(records, int(match["window"]), match["metric"])
        return f"{match[1]}{body}\n{match['end']}"

    return _BLOCK.sub(table, text)


def main(paths: list[str]) -> int:
    root = Path(__file__).resolve().parents[2]
    for path in paths:
        file = Path(path)
        file.write_text(render(file.read_text(), root))
        print(f"updated {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
