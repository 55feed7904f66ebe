"""benchmarks/xmp_embed.py runs as documented (tiny sizes): both modes through pick's own
write_sidecars on the same JPEGs, a first write and a re-run each, a row per threads value."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_script_times_embed_beside_sidecars_on_the_same_jpegs(tmp_path: Path) -> None:
    out = tmp_path / "xmp-embed.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "xmp_embed.py"),
        "--n", "4", "--megapixels", "0.3", "--threads", "1,4", "--repeats", "1",
        "--out", str(out), "--work-dir", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert (record["n"], record["megapixels"], record["repeats"]) == (4, 0.3, 1)
    assert record["work_dir"] == str(tmp_path.resolve())
    assert [(r["threads"], r["step"]) for r in record["rows"]] == [
        (1, "first write"), (1, "re-run"), (4, "first write"), (4, "re-run"),
    ]  # fmt: skip
    for r in record["rows"]:
        assert r["beside_s"] > 0
        assert r["embed_s"] > 0
        assert r["embed_over_beside"] == r["embed_s"] / r["beside_s"]
    assert "embed / beside" in proc.stdout
    assert not list(tmp_path.glob("keeper-xmp-embed-*"))  # its work folder is removed
