"""A merge into a packet that already holds what it would write runs no exiv2 write.

exiv2's XMP writer takes time quadratic in a packet's properties (a darktable history of 300
items: about a second a write), and a merge that changes nothing wrote the packet to find that
out: every re-run of ``keeper pick`` paid that for every sidecar. ``merge_packet`` now
compares the fields it read with those the merge would set and returns the packet as it is.
These tests check that no write runs then, and that the answer is the one the full merge gives.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from support import import_benchmark
from test_xmp_merge_random import SEEDS, _packet

from keeper_core import handback
from keeper_core.errors import DataError
from keeper_core.handback import RECORD_KEY, KeeperXmp, merge_packet, parse_xmp_packet

RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
CHOICE = KeeperXmp(3, "Green", {"group": "g1", "rank": "1", "reasons": "sharpest of 4"})


def _darktable(n: int) -> bytes:
    """A darktable sidecar with a history of ``n`` steps (the benchmark's own packets)."""
    return bytes(import_benchmark("xmp_rerun").darktable_packet(n))


def _no_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("exiv2's writer ran")

    monkeypatch.setattr(handback, "_rewritten", refuse)


def test_a_rerun_on_a_sidecar_keeper_wrote_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    first = merge_packet(_darktable(50), CHOICE, source="s.xmp")
    _no_writes(monkeypatch)
    again = merge_packet(first.packet, CHOICE, source="s.xmp")
    assert again.packet is first.packet
    # keeper's reasons alone moved (a library grew): the file stays as it is
    moved = KeeperXmp(3, "Green", {**CHOICE.fields, "reasons": "sharpest of 5"})
    assert merge_packet(first.packet, moved, source="s.xmp").packet is first.packet


def test_a_person_s_stars_in_another_tool_s_layout_write_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Lightroom saved the person's two stars (elements, its own layout) over keeper's sidecar:
    the person's value stays, keeper's fields are there, so nothing is written."""
    first = merge_packet(_darktable(5), CHOICE, source="s.xmp")
    record = f"<keeper:xmp>{parse_xmp_packet(first.packet, 's')[RECORD_KEY]}</keeper:xmp>"
    fields = "".join(f"<keeper:{k}>{v}</keeper:{k}>" for k, v in CHOICE.fields.items())
    lightroom = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="' + RDF + '">'
        '<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
        f'xmlns:keeper="{handback.KEEPER_NS}"><xmp:Rating>2</xmp:Rating>'
        f"<xmp:Label>Green</xmp:Label>{record}{fields}</rdf:Description></rdf:RDF></x:xmpmeta>"
    ).encode()
    _no_writes(monkeypatch)
    merged = merge_packet(lightroom, CHOICE, source="s.xmp")
    assert merged.packet is lightroom
    assert merged.kept == ("rating",)


@pytest.mark.parametrize("seed", SEEDS[:100])
def test_the_shortcut_answers_as_the_full_merge(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """For the random packets, merged once and then again with the same choice, another rating,
    other fields or ``overwrite_ratings``: the same packet and kept values with the shortcut as
    with every merge run in full."""
    r = random.Random(seed)
    packet, _ = _packet(r)
    first_choice = KeeperXmp(r.randint(-1, 5), r.choice([None, "Blue"]), {"group": f"g{seed}"})
    try:
        first = merge_packet(packet, first_choice, source="s").packet
    except DataError:
        return  # refused: the random merge test names why
    choices = [
        (first_choice, False),
        (KeeperXmp(first_choice.rating, first_choice.label, {"group": "other"}), False),
        (KeeperXmp((first_choice.rating + 2) % 6, "Red", first_choice.fields), False),
        (first_choice, True),
    ]
    for old in (packet, first):
        for choice, overwrite in choices:
            fast = merge_packet(old, choice, source="s", overwrite_ratings=overwrite)
            with monkeypatch.context() as m:
                m.setattr(handback, "_applied", lambda fields, changes: {"Xmp.never.x": "1"})
                full = merge_packet(old, choice, source="s", overwrite_ratings=overwrite)
            assert fast == full
