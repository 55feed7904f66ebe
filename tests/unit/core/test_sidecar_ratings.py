"""A rating or colour label a person gave stays: keeper changes only the ones it set.

A photographer rates in Lightroom or darktable, before keeper runs or after; ``keeper pick
--xmp beside`` then merges into those sidecars. ``keeper:xmp`` records the rating and label
keeper last set, so a value that differs from it (or one there before keeper ever wrote) is a
person's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from keeper_core.handback import SidecarWrite, read_sidecar, write_sidecar

RATED_IN_LIGHTROOM = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
   xmp:Rating="5"
   xmp:Label="Purple"/>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>"""


def _edit(path: Path, old: str, new: str) -> None:
    """What a photo tool does: change a value in the sidecar keeper wrote."""
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new), encoding="utf-8")


def _values(path: Path) -> tuple[object, object]:
    fields = read_sidecar(str(path))
    return fields.get("Xmp.xmp.Rating"), fields.get("Xmp.xmp.Label")


def test_a_persons_rating_and_label_from_before_keeper_stay(tmp_path: Path) -> None:
    path = tmp_path / "IMG_1.xmp"
    path.write_text(RATED_IN_LIGHTROOM, encoding="utf-8")

    result = write_sidecar(str(path), rating=-1, label=None, keeper_fields={"decision": "reject"})

    assert result == SidecarWrite(changed=True, kept=("rating", "label"))
    assert _values(path) == ("5", "Purple")
    fields = read_sidecar(str(path))
    assert fields["Xmp.keeper.decision"] == "reject"  # keeper's view is still written
    assert fields["Xmp.keeper.xmp"] == "|"  # keeper set neither: both are the person's
    # Re-running changes nothing and still says whose values these are.
    again = write_sidecar(str(path), rating=-1, label=None, keeper_fields={"decision": "reject"})
    assert again == SidecarWrite(changed=False, kept=("rating", "label"))


def test_keepers_own_values_follow_each_run(tmp_path: Path) -> None:
    path = tmp_path / "IMG_1.xmp"
    assert write_sidecar(str(path), rating=3, label="Green").kept == ()
    assert write_sidecar(str(path), rating=1, label="Red") == SidecarWrite(True, ())
    assert _values(path) == ("1", "Red")


def test_a_rating_changed_after_keeper_wrote_it_stays_and_the_label_still_follows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "IMG_1.xmp"
    write_sidecar(str(path), rating=3, label="Green")
    _edit(path, 'xmp:Rating="3"', 'xmp:Rating="5"')  # the photographer gave it five stars

    result = write_sidecar(str(path), rating=1, label="Red")

    assert result.kept == ("rating",)
    assert _values(path) == ("5", "Red")


def test_a_persons_rating_stays_after_a_run_that_chose_the_same(tmp_path: Path) -> None:
    """keeper once chooses what the person gave: the rating is still the person's, and a later
    run choosing otherwise leaves it (the record keeps what keeper last set, not its choice)."""
    path = tmp_path / "IMG_1.xmp"
    write_sidecar(str(path), rating=3, label="Green")
    _edit(path, 'xmp:Rating="3"', 'xmp:Rating="5"')
    assert write_sidecar(str(path), rating=5, label="Green") == SidecarWrite(False, ("rating",))
    assert write_sidecar(str(path), rating=1, label="Red").kept == ("rating",)
    assert _values(path) == ("5", "Red")
    assert read_sidecar(str(path))["Xmp.keeper.xmp"] == "3|Red"
    _edit(path, 'xmp:Rating="5"', 'xmp:Rating="3"')  # handed back: keeper's own value again
    assert write_sidecar(str(path), rating=1, label="Red").kept == ()
    assert _values(path) == ("1", "Red")


def test_a_label_removed_by_a_person_is_not_put_back(tmp_path: Path) -> None:
    path = tmp_path / "IMG_1.xmp"
    write_sidecar(str(path), rating=3, label="Green")
    _edit(path, 'xmp:Label="Green"', "")

    result = write_sidecar(str(path), rating=2, label="Yellow")

    assert result.kept == ("label",)
    assert _values(path) == ("2", None)


def test_overwrite_ratings_replaces_a_persons_values(tmp_path: Path) -> None:
    path = tmp_path / "IMG_1.xmp"
    path.write_text(RATED_IN_LIGHTROOM, encoding="utf-8")

    result = write_sidecar(str(path), rating=-1, label=None, overwrite_ratings=True)

    assert result == SidecarWrite(True, ())
    assert _values(path) == ("-1", None)


@pytest.mark.parametrize("label", ["Green", None])
def test_a_sidecar_keeper_wrote_before_it_kept_a_record_counts_as_keepers(
    tmp_path: Path, label: str | None
) -> None:
    # An older keeper wrote rating, label and its fields, but no keeper:xmp.
    path = tmp_path / "IMG_1.xmp"
    write_sidecar(str(path), rating=4, label="Green", keeper_fields={"rank": "1"})
    _edit(path, ' keeper:xmp="4|Green"', "")
    assert "Xmp.keeper.xmp" not in read_sidecar(str(path))

    result = write_sidecar(str(path), rating=2, label=label, keeper_fields={"rank": "2"})

    assert result.kept == ()
    assert _values(path) == ("2", label)
