"""Measured tables in the README and the docs are the committed results' own: under a
``<!-- results: FILE -->`` marker, the table must appear verbatim in ``FILE`` (a
``perco-eval`` summary committed under ``results/``, its local paths stripped)."""

from __future__ import annotations

import re

from conftest import ROOT

MARKER = re.compile(r"<!-- results: (\S+) -->\n((?:\|.*\n)+)")


def test_every_marked_table_is_its_committed_results_file():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    found = [m for page in pages for m in MARKER.findall(page.read_text())]
    assert len(found) >= 2, "no results markers in the README and the docs"
    for path, table in found:
        source = ROOT / path
        assert source.is_file(), f"{path}: the results file is not committed"
        assert table in source.read_text(), f"the README's table under {path} is not the file's"


def test_committed_results_hold_no_local_paths():
    for path in (ROOT / "results").rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert str(ROOT) not in text and "/tmp/" not in text and "/root/" not in text, path


def test_the_backbone_table_is_rendered_from_its_results():
    import subprocess
    import sys

    script = ROOT / "scripts" / "backbone_table.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
