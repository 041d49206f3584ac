"""The two reports: ``scripts/wandb_report.py`` (W&B's report API; it needs the network to save, so
what it builds is checked without saving) and ``scripts/report.py`` (a static HTML page from the
CSV logs, opened in real headless Chromium, whose screenshot must show the plots)."""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from conftest import compose_train

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------- W&B report
def test_wandb_report_object_compares_methods_sweep_and_search(monkeypatch):
    pytest.importorskip(
        "wandb_workspaces", reason="wandb-workspaces is not installed (pip install -e '.[dev]')"
    )
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.reports.v2.interface as wri

    report = load_script("wandb_report").build_report(
        "tsd-test", "tsd", sweep_group="mcts_countdown-sweep-s1"
    )
    assert isinstance(report, wr.Report) and (report.entity, report.project) == ("tsd-test", "tsd")
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    methods, sweep, search = grids
    rs = methods.runsets[0]
    assert rs.groupby == ["group"] and "JobType" in rs.filters and "'train'" in rs.filters
    assert "config:run.value.method" in rs.pinned_columns and "summary:eval/mean@16" in rs.pinned_columns
    lines = [p for p in methods.panels if isinstance(p, wr.LinePlot)]
    assert {p.x for p in lines} == {
        "trainer/global_step",
        "compute/generated_tokens",
        "compute/trained_tokens",
    }
    assert all(p.y == ["eval/mean@16"] and p.groupby_rangefunc == "stderr" for p in lines)
    assert any(
        isinstance(p, wr.BarPlot) and p.metrics == [wr.SummaryMetric("eval/mean@16")] for p in methods.panels
    )
    heat = next(p for p in sweep.panels if isinstance(p, wr.ScatterPlot))
    assert (heat.x, heat.y, heat.z) == (
        wr.Config("rollout.workers"),
        wr.Config("rollout.iterations"),
        wr.SummaryMetric("eval/mean@16"),
    )
    assert "mcts_countdown-sweep-s1" in sweep.runsets[0].filters and "'sweep'" in sweep.runsets[0].filters
    assert {type(p).__name__ for p in search.panels} == {"MediaBrowser", "WeavePanelSummaryTable"}

    # the spec save() would upload: serialising a run set looks its project's id up on the W&B
    # server; that one GraphQL call is answered by a stub (the rest is the library's own code)
    lookups: list[dict] = []

    def fake_graphql(api, query, variables):
        lookups.append(variables)
        return {"project": {"internalId": "UHJvamVjdDox"}}

    monkeypatch.setattr(wri, "_get_api", lambda: None)
    monkeypatch.setattr(wri, "execute_graphql", fake_graphql)
    spec = json.loads(report._to_model().spec.model_dump_json(by_alias=True, exclude_none=True))
    assert lookups and all(v == {"entityName": "tsd-test", "projectName": "tsd"} for v in lookups)
    panels = [
        p
        for b in spec["blocks"]
        if b["type"] == "panel-grid"
        for p in b["metadata"]["panelBankSectionConfig"]["panels"]
    ]
    by_type: dict[str, list[dict]] = {}
    for p in panels:
        by_type.setdefault(p["viewType"], []).append(p["config"])
    x_axes = {c["xAxis"] for c in by_type["Run History Line Plot"]}
    assert {"trainer/global_step", "compute/generated_tokens", "compute/trained_tokens"} <= x_axes
    (scatter,) = by_type["Scatter Plot"]
    assert (scatter["xAxis"], scatter["yAxis"], scatter["zAxis"]) == (
        "config:rollout.value.workers",
        "config:rollout.value.iterations",
        "summary:eval/mean@16",
    )
    assert by_type["Media Browser"][0]["mediaKeys"] == ["eval/search_tree"]
    run_sets = [rs for b in spec["blocks"] if b["type"] == "panel-grid" for rs in b["metadata"]["runSets"]]
    assert run_sets[0]["grouping"] == [{"section": "run", "name": "group"}]
    sweep_filters = run_sets[1]["filters"]["filters"]
    assert {(f["key"]["name"], f["value"]) for f in sweep_filters} == {
        ("jobType", "sweep"),
        ("group", "mcts_countdown-sweep-s1"),
    }


def test_wandb_report_dry_run_prints_the_report_without_saving():
    pytest.importorskip(
        "wandb_workspaces", reason="wandb-workspaces is not installed (pip install -e '.[dev]')"
    )
    p = subprocess.run(
        [sys.executable, "scripts/wandb_report.py", "--entity", "tsd-test", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": ":".join(sys.path),
            "WANDB_MODE": "offline",
            "HOME": "/nonexistent",
        },
    )  # no API key anywhere: a save would fail; the dry run must not try
    assert p.returncode == 0, p.stderr[-2000:]
    assert "ScatterPlot" in p.stdout and "compute/generated_tokens" in p.stdout and "not saved" in p.stdout


# ---------------------------------------------------------------------------- static HTML report
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def browser() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def screenshot(html: Path, png: Path, profile: Path, size: str = "1400,1800") -> np.ndarray:
    """A real headless Chromium screenshot of ``html`` (RGB floats in [0, 1], (H, W, 3))."""
    cmd = [
        browser(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={size}",
        f"--screenshot={png}",
        html.resolve().as_uri(),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and png.exists(), p.stderr[-2000:]
    return matplotlib.image.imread(png)[..., :3]


def near(img: np.ndarray, rgb: tuple[int, int, int], tol: float = 0.12) -> np.ndarray:
    """(H, W) mask of the pixels within ``tol`` of the colour (per channel, 0..1)."""
    return (np.abs(img - np.array(rgb) / 255.0) <= tol).all(-1)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, policy_dir):
    """An MCTS and a group-sampling CISPO smoke run, evaluated after every step (curves of 4 points)."""
    from tsd.train import train

    root = tmp_path_factory.mktemp("runs")
    runs = []
    for exp in ("mcts_countdown", "cispo_countdown"):
        out = root / exp
        overrides = [f"experiment={exp}", "debug=smoke", f"model.name_or_path={policy_dir}",
                     "callbacks.eval.every_n_steps=1"]  # fmt: skip
        train(compose_train(overrides, out))
        runs.append(out)
    return runs


@pytest.mark.slow
def test_static_report_shows_the_plots_in_a_real_browser(two_runs, tmp_path):
    page = tmp_path / "report.html"
    p = subprocess.run(
        [sys.executable, "scripts/report.py", *map(str, two_runs), "--out", str(page)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    text = page.read_text()
    assert "MCTSRollout+CISPOLoss" in text and "GroupRollout+CISPOLoss" in text  # the final table
    assert "http://" not in text and "https://" not in text  # self-contained: nothing to fetch
    if browser() is None:
        pytest.skip(reason="no headless browser (apt-get install chromium; .ci/run installs it)")
    shot = screenshot(page, tmp_path / "report.png", tmp_path / "profile")
    # the same page with the curves replaced by a white picture of the same size: the same layout,
    # what the page shows where the plots are when they are not there
    start = text.index("<img class='plot' id='curves'")
    src_at = text.index("src='", start) + 5
    src = text[src_at : text.index("'", src_at)]
    png = base64.b64decode(src.split(",", 1)[1])
    width, height = struct.unpack(">II", png[16:24])  # the PNG's IHDR
    white = tmp_path / "white.png"
    matplotlib.image.imsave(white, np.ones((height, width, 3)))
    blank = tmp_path / "no_curves.html"
    blank.write_text(
        text.replace(src, "data:image/png;base64," + base64.b64encode(white.read_bytes()).decode())
    )
    base = screenshot(blank, tmp_path / "no_curves.png", tmp_path / "profile2")

    # the plot region: where the two screenshots differ (the layout is the same elsewhere)
    rows, cols = np.nonzero((np.abs(shot - base) > 0.02).any(-1))
    assert rows.size, "the screenshot does not change when the plots are removed"
    region = shot[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    empty = base[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert region.shape[0] > 250 and region.shape[1] > 900, region.shape  # three panels side by side
    ink = (region < 0.9).any(-1).mean()  # non-background share
    assert 0.03 < ink < 0.6, ink
    assert (empty < 0.9).any(-1).mean() < 0.005  # without the plots the region is blank
    # matplotlib's first two line colours (tab:blue, tab:orange): the two runs' curves
    blue, orange = near(region, (31, 119, 180)).sum(), near(region, (255, 127, 14)).sum()
    assert blue > 300 and orange > 300, (blue, orange)
