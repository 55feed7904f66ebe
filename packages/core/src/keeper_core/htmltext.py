"""Text for keeper's HTML pages: escaped, with Unicode's bidirectional controls made visible.

A file name is written by whoever made the file. ``IMG_\u202egpj.exe`` shows as ``IMG_exe.jpg``
in a browser: U+202E (right-to-left override) reverses what follows it up to the end of its
paragraph, and the isolates and embeddings (U+2066-U+2069, U+202A-U+202D) and marks reorder
text around them too. Escaping (``&``, ``<``, quotes) stops markup, not this, so keeper's pages
show each such character as ``<U+202E>``: the name reads as the bytes say, and the reader sees
that it holds one. The review page does the same in its script (``ui/app.js``, ``shown``).
"""

from __future__ import annotations

import html
import re

#: Unicode's bidirectional formatting characters (UAX #9 section 2): embeddings and overrides
#: (U+202A-U+202E), isolates (U+2066-U+2069), the marks LRM, RLM and ALM.
BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible_bidi(text: str) -> str:
    """``text`` with each bidirectional control written as ``<U+XXXX>``."""
    return BIDI_CONTROLS.sub(lambda m: f"<U+{ord(m.group()):04X}>", text)


def escape(value: object) -> str:
    """``str(value)`` for HTML text or a quoted attribute: bidi controls visible, then escaped."""
    return html.escape(visible_bidi(str(value)), quote=True)
