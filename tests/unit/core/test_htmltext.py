"""keeper_core.htmltext: bidirectional controls shown as <U+XXXX> on every page, the review page's
script (ui/app.js ``shown``) doing the same as the Python pages."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from keeper_core.htmltext import escape, visible_bidi

APP_JS = (
    Path(__file__).resolve().parents[3]
    / "packages" / "serve" / "src" / "keeper_serve" / "ui" / "app.js"
)  # fmt: skip
# UAX #9's explicit formatting characters and marks.
CONTROLS = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
# Text that must reach the page as it is: Hebrew, Arabic, digits, a ZWJ emoji, U+2028, CJK.
PLAIN = ["שלום.jpg", "صورة ٣.jpg", "IMG_0001.JPG", "👨\u200d👩\u200d👧.jpg", "a\u2028b", "写真.jpg"]


@pytest.mark.parametrize("code", CONTROLS, ids=lambda c: f"U+{c:04X}")
def test_each_bidi_control_is_shown_by_its_code_point(code: int) -> None:
    assert visible_bidi(f"IMG_{chr(code)}gpj.exe") == f"IMG_<U+{code:04X}>gpj.exe"


@pytest.mark.parametrize("text", PLAIN)
def test_right_to_left_names_and_other_text_are_left_as_they_are(text: str) -> None:
    assert visible_bidi(text) == text
    assert escape(text) == text


def test_escape_shows_the_control_then_escapes_markup() -> None:
    assert (
        escape("IMG_\u202egpj.exe<b>'\"&") == "IMG_&lt;U+202E&gt;gpj.exe&lt;b&gt;&#x27;&quot;&amp;"
    )
    assert escape(7) == "7"


@pytest.mark.skipif(
    shutil.which("node") is None,
    reason="node is not installed (Debian's nodejs): the review page's script cannot run here; "
    "the Python pages' escaping is checked above",
)
def test_the_review_pages_script_shows_what_the_python_pages_show() -> None:
    source = APP_JS.read_text()
    pattern = re.search(r"^ *const BIDI_CONTROLS = .*?;$", source, re.M)
    function = re.search(r"^ *function shown\(text\) \{.*?^  \}$", source, re.M | re.S)
    assert pattern, "app.js has no const BIDI_CONTROLS"
    assert function, "app.js has no function shown(text)"
    cases = [f"x{chr(c)}y" for c in CONTROLS] + PLAIN + ["\u202e\u2066\u202c", ""]
    script = (
        f"{pattern.group()}\n{function.group()}\n"
        f"console.log(JSON.stringify({json.dumps(cases)}.map(shown)));"
    )
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [visible_bidi(c) for c in cases]
