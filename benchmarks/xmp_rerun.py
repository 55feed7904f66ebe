"""A re-run's XMP merge into sidecars keeper wrote before: the shortcut against the full merge.

    .venv/bin/python benchmarks/xmp_rerun.py [--items 10,100,300,1000] [--repeats 3] \
        [--out benchmarks/results/xmp-rerun.json]

darktable keeps a photo's edit history in its sidecar, one struct per step, and exiv2's XMP writer
takes time quadratic in a packet's properties (docs/picking.md). A ``keeper pick`` re-run merges
the same choice into every sidecar again. ``handback.merge_packet`` returns a packet that already
holds what the merge would set as it is, without running exiv2's writer; before, it wrote the
packet to find out that nothing changed. Side by side, in this process, on the same packets (a
darktable-like history of N items, merged once by keeper first; that first merge is timed too):

- **shortcut**: ``merge_packet`` as it is;
- **full merge**: the same call with the shortcut's comparison made to fail (``_applied``
  patched), so exiv2's writer runs as it did for every re-run before the shortcut.

Both must return the same packet (checked; the script exits 1 on a mismatch). CPU seconds
(``time.process_time``), best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from embed import machine_info, write_record

from keeper_core import handback
from keeper_core.handback import KeeperXmp, merge_packet

RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DT = "http://darktable.sf.net/"
CHOICE = KeeperXmp(3, "Green", {"group": "g000001", "rank": "1", "reasons": "sharpest of 4"})


def darktable_packet(n: int) -> bytes:
    """A sidecar as darktable writes one: a history of ``n`` steps, each a struct of 10 fields."""
    items = "".join(
        f'<rdf:li darktable:num="{i}" darktable:operation="exposure" darktable:enabled="1" '
        f'darktable:modversion="6" darktable:params="0000000000a0{i:06d}" '
        'darktable:multi_name="" darktable:multi_priority="0" darktable:blendop_version="11" '
        'darktable:blendop_params="gz11eJxjYGBgkGAAgRNODFPGFkAAAw" '
        f'darktable:iop_order="{i}.5"/>'
        for i in range(n)
    )
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
        f'<rdf:RDF xmlns:rdf="{RDF}"><rdf:Description rdf:about="" '
        f'xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:darktable="{DT}" xmp:Rating="1" '
        f'darktable:history_end="{n}"><darktable:history><rdf:Seq>{items}</rdf:Seq>'
        '</darktable:history></rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def best_of(repeats: int, call: Callable[[], bytes]) -> tuple[float, bytes]:
    times, out = [], b""
    for _ in range(repeats):
        t = time.process_time()
        out = call()
        times.append(time.process_time() - t)
    return min(times), out


def full_merge(packet: bytes) -> bytes:
    real = handback._applied
    handback._applied = lambda fields, changes: {"Xmp.never.x": "1"}  # type: ignore[assignment]
    try:
        return merge_packet(packet, CHOICE, source="bench").packet
    finally:
        handback._applied = real  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", default="10,100,300,1000", help="history lengths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/xmp-rerun.json")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    ok = True
    print(f"{'items':>6} {'KB':>6} {'first merge s':>14} {'full re-run s':>14} "
          f"{'shortcut s':>11} {'speed-up':>9}")  # fmt: skip
    for n in (int(x) for x in args.items.split(",")):
        original = darktable_packet(n)
        first, written = best_of(1, lambda: merge_packet(original, CHOICE, source="b").packet)  # noqa: B023
        full, a = best_of(args.repeats, lambda: full_merge(written))  # noqa: B023
        fast, b = best_of(args.repeats, lambda: merge_packet(written, CHOICE, source="b").packet)  # noqa: B023
        same = a == b == written
        ok &= same
        row = {
            "items": n,
            "packet_kb": round(len(written) / 1024, 1),
            "first_merge_s": round(first, 4),
            "rerun_full_s": round(full, 4),
            "rerun_shortcut_s": round(fast, 4),
            "speedup": round(full / fast, 1) if fast else None,
            "identical": same,
        }
        rows.append(row)
        print(f"{n:>6} {row['packet_kb']:>6} {first:>14.3f} {full:>14.3f} {fast:>11.4f} "
              f"{row['speedup']:>8}x{'' if same else '  MISMATCH'}")  # fmt: skip
    out = {"command": " ".join(sys.argv), "rows": rows, "machine": machine_info()}
    write_record(args.out, out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
