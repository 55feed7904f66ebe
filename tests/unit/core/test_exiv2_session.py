"""keeper_core.exiv2_session: each keeper call into exiv2 runs at its own log level, with the
process's exiv2 to itself."""

from __future__ import annotations

import threading

import pytest

from keeper_core.exiv2_session import exiv2

#: The first part of a sidecar: exiv2 takes it for XMP and its toolkit fails on it.
BROKEN = (
    b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta '
    b'xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="3"'
)


def _raises(pyexiv2: object) -> bool:
    """Whether exiv2 raises for a packet it cannot parse (it does only where errors are logged)."""
    try:
        img = pyexiv2.ImageData(BROKEN)  # type: ignore[attr-defined]
    except RuntimeError:
        return True
    assert img.read_xmp() == {}  # muted: read as empty
    img.close()
    return False


def test_each_block_runs_at_its_level_and_a_nested_one_gives_the_outer_level_back() -> None:
    with exiv2("error") as pyexiv2:
        assert _raises(pyexiv2)
        with exiv2("mute"):
            assert not _raises(pyexiv2)
        assert _raises(pyexiv2)
    with exiv2("mute") as pyexiv2:
        assert not _raises(pyexiv2)
    with exiv2("error") as pyexiv2:
        pyexiv2.set_log_level(4)  # code outside keeper changed it meanwhile
    with exiv2("error") as pyexiv2:
        assert _raises(pyexiv2)


def test_another_thread_waits_for_the_block_to_end() -> None:
    entered, done = threading.Event(), threading.Event()
    seen: list[bool] = []

    def other() -> None:
        entered.set()
        with exiv2("mute") as pyexiv2:
            seen.append(_raises(pyexiv2))
        done.set()

    with exiv2("error") as pyexiv2:
        t = threading.Thread(target=other, daemon=True)
        t.start()
        assert entered.wait(10)
        assert not done.wait(0.3)  # held off while this block runs ...
        assert _raises(pyexiv2)  # ... which keeps its level
    t.join(timeout=10)
    assert seen == [False]


def test_an_unknown_level_is_refused() -> None:
    with pytest.raises(KeyError), exiv2("warn"):  # type: ignore[arg-type]
        pass
