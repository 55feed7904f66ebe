"""Every text the review page puts on screen from data goes through ``shown`` (bidi controls as
``<U+202E>``, as keeper_core.htmltext does on keeper's HTML pages): a file named
``IMG_\u202egpj.exe`` read ``IMG_exe.jpg`` in a tile's tooltip and in the status line.

A source check: each assignment to ``textContent``, ``title`` or ``alt`` in app.js is of
``shown(...)``, or of text made only of the page's own words and numbers (listed here).
"""

from __future__ import annotations

import re
from importlib import resources

APP_JS = resources.files("keeper_serve") / "ui" / "app.js"
ASSIGNMENT = re.compile(r"\.(textContent|title|alt)\s*=\s*(.+?);\s*(//.*)?$")
#: Right-hand sides with no data in them: empty, the page's counts, its own labels.
OWN_TEXT = (
    re.compile(r'^""$'),
    re.compile(r"^`[^`$]*`$"),  # a template without placeholders
    re.compile(r'^"[^"]*"$'),
    re.compile(r"^action \? `you: \$\{MINE\[action\]\}` : \"\"$"),
    re.compile(r"^`groups \$\{fmt\.format\(.*\)\}`$"),
    re.compile(r'^r \? plural\(r\.count, "candidate", "candidates"\) : state\.loading \?.*$'),
)


def test_every_text_from_data_is_shown_with_its_bidi_controls_visible() -> None:
    unshown = []
    for n, line in enumerate(APP_JS.read_text(encoding="utf-8").splitlines(), 1):
        m = ASSIGNMENT.search(line)
        if not m:
            continue
        rhs = m.group(2).strip()
        if "shown(" in rhs or any(p.match(rhs) for p in OWN_TEXT):
            continue
        unshown.append(f"app.js:{n}: {line.strip()}")
    assert unshown == []
