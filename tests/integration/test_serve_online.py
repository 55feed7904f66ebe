"""OnlineFigures on the session's Ray: the gauges reach Prometheus's text export.

The figures themselves are checked in tests/unit/serve/test_online.py; this checks the wiring a
unit test cannot: a Serve replica's thread computes at start and Ray exports the gauges, tagged
arm and model, on the node's metrics port.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from support import offer_rows

from keeper_core.feedback import FeedbackEvent, FeedbackLog, OfferLog

pytestmark = pytest.mark.integration


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_online_gauges_are_exported(shared_serve: int, tmp_path: Path) -> None:
    import ray
    from ray import serve

    from keeper_serve.config import FeedbackArgs
    from keeper_serve.online import OnlineFigures

    offers = OfferLog(str(tmp_path / "offers"))
    for req, arm in (("a", "champion"), ("b", "challenger")):
        offers.append_rows(offer_rows(req, arm, "g", 3), sync=True)
    FeedbackLog(str(tmp_path / "events")).append(
        [FeedbackEvent(request_id="b", image_id="b-img0", action="picked-as-keeper")], sync=True
    )
    args = FeedbackArgs(root=str(tmp_path), online_poll_s=1, online_window_s=3600)
    handle = serve.run(
        OnlineFigures.options(name="OnlineFigures").bind(args),
        name="keeper-online-test",
        route_prefix=None,
    )
    try:
        deadline = time.monotonic() + 60
        info = handle.info.remote().result()
        while info["computed_at"] is None and time.monotonic() < deadline:
            time.sleep(0.5)
            info = handle.info.remote().result()
        assert info["answers"] == 2
        assert info["error"] is None
        port = ray.nodes()[0]["MetricsExportPort"]
        want = "ray_keeper_online_top1{"
        text = ""
        deadline = time.monotonic() + 90  # Ray's agent exports every few seconds
        while time.monotonic() < deadline:
            text = scrape(port)
            lines = [ln for ln in text.splitlines() if ln.startswith(want)]
            if any('arm="challenger"' in ln and 'model="models:/r/2"' in ln for ln in lines):
                break
            time.sleep(2)
        lines = [ln for ln in text.splitlines() if ln.startswith(want)]
        hit = [ln for ln in lines if 'arm="challenger"' in ln and 'model="models:/r/2"' in ln]
        assert hit, f"no challenger top-1 gauge among {lines[:10]}"
        assert float(hit[0].rsplit(" ", 1)[1]) == 1.0  # its one keeper was its first choice
        # No keeper picked on the champion: its top-1 is NaN, which Ray does not export.
        assert not [ln for ln in lines if 'arm="champion"' in ln], lines
        answers = [
            ln
            for ln in text.splitlines()
            if ln.startswith("ray_keeper_online_answers{")
            and 'arm="champion"' in ln
            and 'model="*"' in ln
        ]
        assert answers, "no champion answers gauge"
        assert float(answers[0].rsplit(" ", 1)[1]) == 1.0
    finally:
        serve.delete("keeper-online-test")
