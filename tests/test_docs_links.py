"""The docs hold together: every relative link in README.md and docs/*.md
names a file that exists, and every file under benchmarks/results/ is cited
by some doc (directly or through a linked folder), so a result no doc
explains does not linger and a doc never points at a result that is gone."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _links():
    for doc in DOCS:
        for m in LINK.finditer(doc.read_text()):
            target = m.group(1).split("#")[0]
            if target and not re.match(r"[a-z]+:", target):
                yield doc, target, (doc.parent / target).resolve()


def test_every_relative_link_in_the_docs_resolves():
    broken = [f"{doc.relative_to(ROOT)}: {target}" for doc, target, path in _links() if not path.exists()]
    assert not broken, broken


def test_every_benchmark_result_is_cited_by_a_doc():
    linked = {path for _, _, path in _links()}
    results = sorted(p for p in (ROOT / "benchmarks" / "results").rglob("*") if p.is_file())
    assert len(results) > 20
    orphans = [str(p.relative_to(ROOT)) for p in results
               if not any(q == p.resolve() or q in p.resolve().parents for q in linked)]
    assert not orphans, orphans
