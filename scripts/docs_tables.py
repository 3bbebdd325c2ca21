"""Regenerate the preset tables in docs/layer-plans.md and docs/recipes.md
from the presets (between their ``<!-- generated: NAME -->`` and
``<!-- end generated -->`` lines):

    python scripts/docs_tables.py          # rewrite the docs
    python scripts/docs_tables.py --check  # exit 1 if a table is out of date (tests/test_docs_tables.py)
"""

import argparse
import sys
from pathlib import Path

from mixattn.docs_tables import update_docs

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = update_docs(Path(__file__).resolve().parents[1], check=args.check)
    for path in stale:
        print(f"{path}: out of date; run python scripts/docs_tables.py" if args.check else f"rewrote {path}")
    sys.exit(1 if args.check and stale else 0)
