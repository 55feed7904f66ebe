"""A new packet written without exiv2 (``handback.fresh_packet``) is exiv2's, byte for byte."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import pytest

from keeper_core import handback
from keeper_core.handback import KeeperXmp, fresh_packet, merge_packet, parse_xmp_packet


def _exiv2s(choice: KeeperXmp) -> bytes:
    return handback._merge_with_exiv2(b"", choice, "test.xmp", False, "an XMP sidecar").packet


@pytest.fixture
def fresh_check_again() -> Iterator[None]:
    """The once-a-process layout check forgotten before and after the test."""
    handback._fresh_layout_holds.cache_clear()
    yield
    handback._fresh_layout_holds.cache_clear()


def _storable() -> list[str]:
    """Every character a keeper value may hold (``_check_text``) but DEL: the whole BMP, and
    every 97th code point beyond it."""
    ranges = [(0x9, 0xA), (0xD, 0xD), (0x20, 0x7E), (0x80, 0xD7FF), (0xE000, 0xFFFD)]
    chars = [chr(c) for lo, hi in ranges for c in range(lo, hi + 1)]
    return chars + [chr(c) for c in range(0x10000, 0x110000, 97)]


def test_every_storable_character_is_written_as_exiv2_writes_it() -> None:
    chars = _storable()
    for start in range(0, len(chars), 512):
        value = "".join(chars[start : start + 512])
        for choice in (
            KeeperXmp(3, None, {"reasons": value}),
            KeeperXmp(1, value[:40] + "x", {}),  # a label
        ):
            ours = fresh_packet(choice)
            assert ours is not None
            assert ours == _exiv2s(choice), f"characters from U+{ord(chars[start]):04X}"


def _text(rng: random.Random) -> str:
    pieces = ["a", "Z", " ", "  ", "&", "<", ">", '"', "'", "\t", "\n", "\r", "é", "日", "😀"]
    pieces += ["]]>", "&amp;", "=", "|", "sharpness 3.1 sigma below its group", "\u2028", "\ufeff"]
    # prefixes exiv2 reads specially in some values (a language alternative, a comment's charset)
    pieces += ['lang="de-DE" ', 'lang="x-default" ', "charset=Ascii ", "Type=Bag ", "x" * 5000]
    return "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 12)))


def _name(rng: random.Random) -> str:
    first = "abcxyzABCXYZ_"
    rest = first + "0123456789-"
    while True:
        name = rng.choice(first) + "".join(rng.choice(rest) for _ in range(rng.randrange(0, 9)))
        if name != "xmp":
            return name


def test_random_choices_are_written_as_exiv2_writes_them() -> None:
    rng = random.Random(20261207)
    for case in range(300):
        fields = {_name(rng): _text(rng) for _ in range(rng.randrange(0, 7))}
        label = rng.choice([None, "Green", "Red", _text(rng) or "x"])
        if label is not None and label.startswith("type="):
            label = "x" + label
        fields = {k: ("x" + v if v.startswith("type=") else v) for k, v in fields.items()}
        choice = KeeperXmp(rng.randrange(-1, 6), label, fields)
        ours = fresh_packet(choice)
        assert ours == _exiv2s(choice), f"case {case}: {choice!r}"
        read = parse_xmp_packet(ours, "test.xmp")
        assert read["Xmp.xmp.Rating"] == str(choice.rating)
        assert read.get("Xmp.xmp.Label") == label
        for name, value in fields.items():
            assert read[f"Xmp.keeper.{name}"] == value


def test_a_new_packet_needs_no_exiv2(monkeypatch: pytest.MonkeyPatch) -> None:
    choice = KeeperXmp(4, "Green", {"group": "g000007", "rank": "1", "reasons": "sharpest"})
    expected = _exiv2s(choice)
    assert handback._fresh_layout_holds()

    def no_exiv2(*args: object, **kwargs: object) -> None:
        raise AssertionError("exiv2 was asked")

    monkeypatch.setattr(handback, "_merge_with_exiv2", no_exiv2)
    for old in (b"", b"  \n"):
        merge = merge_packet(old, choice, source="new.xmp")
        assert merge.packet == expected
        assert merge.kept == ()


def test_what_the_layout_cannot_hold_goes_to_exiv2() -> None:
    named_xmp = KeeperXmp(2, None, {"xmp": "mine", "group": "g1"})
    assert fresh_packet(named_xmp) is None
    assert merge_packet(b"", named_xmp, source="t.xmp").packet == _exiv2s(named_xmp)

    delete = KeeperXmp(2, None, {"reasons": "a\x7fb"})
    assert fresh_packet(delete) is None
    packet = merge_packet(b"", delete, source="t.xmp").packet
    assert packet == _exiv2s(delete)
    assert b'keeper:reasons="a b"' in packet  # exiv2 writes DEL as a space


def test_an_exiv2_that_lays_packets_out_otherwise_writes_every_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_check_again: None
) -> None:
    monkeypatch.setattr(
        handback, "_FRESH_HEAD", handback._FRESH_HEAD.replace("4.4.0-Exiv2", "4.5.0-Exiv2")
    )
    choice = KeeperXmp(3, "Green", {"group": "g1"})
    with caplog.at_level(logging.INFO, logger="keeper_core.handback"):
        assert fresh_packet(choice) is None
        packet = merge_packet(b"", choice, source="t.xmp").packet
    assert b"4.4.0-Exiv2" in packet
    assert packet == _exiv2s(choice)
    assert "lays new XMP packets out otherwise" in caplog.text


def test_a_fresh_packet_is_a_fixed_point_of_the_merge() -> None:
    choice = KeeperXmp(5, "Green", {"group": "g000001", "rank": "1", "reasons": "a & b\n"})
    packet = merge_packet(b"", choice, source="t.xmp").packet
    assert merge_packet(packet, choice, source="t.xmp").packet is packet
