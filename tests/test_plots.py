"""The curves: dvc.yaml's top-level plots, rendered offline (plots/offline.html inlines vega, vega-lite and
vega-embed; DVC's own page loads them from a CDN and stays blank without a network)."""
import json
import os
import re
import shutil
import subprocess

import pytest
from helpers import REPO, require_tool, run

TEMPLATE = REPO / "plots/offline.html"
PLOT_IDS = ["pretrain_loss", "pretrain_val_bpb", "sft_loss", "rl_reward", "rl_pass_at_k"]


def test_the_offline_template_carries_the_versions_dvc_asks_for():
    from dvc_render.vega import VegaRenderer

    page = TEMPLATE.read_text()
    wanted = dict(re.findall(r"npm/([a-z-]+)@([\d.]+)", VegaRenderer.SCRIPTS))
    assert set(wanted) == {"vega", "vega-lite", "vega-embed"}
    for name, version in wanted.items():
        assert f"/* {name}@{version}, license: plots/licenses/{name}-LICENSE */" in page, (name, version)
        assert (REPO / "plots/licenses" / f"{name}-LICENSE").read_text().strip()
    assert "{plot_divs}" in page and "{refresh_tag}" in page
    assert "{scripts}" not in page and "cdn.jsdelivr" not in page and "<script src" not in page
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        assert os.path.realpath(os.path.join(repo.dvc_dir, repo.config["plots"]["html_template"])) == str(TEMPLATE)


def test_top_level_plots_have_titles_and_axis_labels():
    out = run(["dvc", "plots", "show", "--json", *PLOT_IDS], REPO).stdout
    data = json.loads(out)["data"]
    assert sorted(data) == sorted(PLOT_IDS)
    for pid in PLOT_IDS:
        spec = data[pid][0]["content"]
        y_titles = set(re.findall(r'"y": \{"field": "[^"]+", "type": "quantitative", "title": "([^"]+)"', json.dumps(spec)))
        assert spec["title"]["text"] and spec["encoding"]["x"]["title"] == "step" and len(y_titles) == 1, pid
        assert not y_titles & {"dvc_inferred_y_value", "val_bpb", "reward", "pass_at_1"}, (pid, y_titles)  # a label, not a field
    # SFT's train and val loss are two lines of one plot
    lines = {row["filename::field"] for row in data["sft_loss"][0]["content"]["data"]["values"]}
    assert lines == {"train.csv::loss_smooth", "val.csv::val_loss"}, lines


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _rendered(page, tmp_path) -> int:
    """How many Vega views headless Chromium draws from `page`, with every host name unresolvable and every
    connection sent to a dead proxy: no network."""
    p = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        f"--user-data-dir={tmp_path / 'chromium'}", "--host-resolver-rules=MAP * ~NOTFOUND",
                        "--proxy-server=127.0.0.1:9", "--virtual-time-budget=15000", "--dump-dom", page.as_uri()],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)}, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    (tmp_path / f"{page.parent.name}.dom.html").write_text(p.stdout)  # kept for a failure's post-mortem
    # vega-embed draws each view into a <canvas class="marks"> sized to the chart
    return len(re.findall(r'<canvas width="[1-9]\d*" height="[1-9]\d*" class="marks"', p.stdout))


@pytest.mark.slow
def test_dvc_plots_render_offline_in_headless_chromium(tmp_path):
    require_tool("chromium", "Debian: apt-get install -y chromium; .ci/run does", found=_chromium() is not None)
    run(["dvc", "plots", "show", *PLOT_IDS, "-o", str(tmp_path / "offline")], REPO)
    assert _rendered(tmp_path / "offline/index.html", tmp_path) == len(PLOT_IDS)
    # DVC's own page under the same conditions draws nothing: the network really is off
    from dvc_render.html import PAGE_HTML

    (tmp_path / "cdn.html").write_text(PAGE_HTML)
    run(["dvc", "plots", "show", *PLOT_IDS, "--html-template", str(tmp_path / "cdn.html"), "-o", str(tmp_path / "cdn")], REPO)
    assert "cdn.jsdelivr.net" in (tmp_path / "cdn/index.html").read_text()
    assert _rendered(tmp_path / "cdn/index.html", tmp_path) == 0
