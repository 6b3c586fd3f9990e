"""Put a demo run's generated summary and a terminal transcript into docs/demo.md.

docs/demo.md quotes the demo's own output instead of numbers typed by hand: the summary that
``fedmerge demo`` writes to ``OUT/summary.md`` and the terminal output of ``make demo``. Each goes
between a pair of markers in the page, replacing what was there::

    <!-- begin: NAME -->
    ...
    <!-- end: NAME -->

    make demo 2>&1 | tee /tmp/make-demo.txt
    fedmerge demo --seeds 3 --out /tmp/demo-3
    python benchmarks/demo_docs.py --summary /tmp/demo-3/summary.md --transcript /tmp/make-demo.txt
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "demo.md"


def splice(page: str, name: str, body: str) -> str:
    """``page`` with the text between the markers of ``name`` replaced by ``body``."""
    pattern = re.compile(rf"(<!-- begin: {re.escape(name)} -->\n).*?(<!-- end: {re.escape(name)} -->)", re.S)
    if not pattern.search(page):
        raise SystemExit(f"{DOC}: no <!-- begin: {name} --> ... <!-- end: {name} --> markers")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), page, count=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary", type=Path, help="OUT/summary.md of a demo run")
    ap.add_argument("--transcript", type=Path, help="what `make demo` printed")
    ap.add_argument("--doc", type=Path, default=DOC)
    args = ap.parse_args(argv)
    page = args.doc.read_text(encoding="utf-8")
    if args.summary:
        page = splice(page, "summary", args.summary.read_text(encoding="utf-8"))
    if args.transcript:
        text = args.transcript.read_text(encoding="utf-8").replace("\r", "\n")
        page = splice(page, "transcript", "```text\n" + text.rstrip("\n") + "\n```")
    args.doc.write_text(page, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
