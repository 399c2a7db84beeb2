"""What a reviewer sees, in a real browser: a real ``mlflow server`` on loopback, a real
``ddsmon scan`` subprocess logging a small checkpoint run into it, and headless Chromium
(Debian's ``chromium``) opening the experiment, the run's charts, its tags and the
dashboard artifact.

Two ways of driving Chromium, each where it works:

* the command line (``--headless --dump-dom`` / ``--screenshot`` with
  ``--virtual-time-budget``): enough for the page structure (which sections, in which
  order) and for the dashboard opened from disk, whose plotly figures draw in virtual
  time;
* the DevTools protocol over ``--remote-debugging-pipe`` (:class:`Devtools`, standard
  library only) where real time is needed: MLflow's chart cards stay loading spinners
  in virtual time, and the dashboard inside MLflow's artifact viewer is a sandboxed
  frame the command line's DOM dump does not enter.

Screenshots go to the test's temporary folder, and also to ``$DDSMON_SCREENSHOTS`` when
set (how docs/img/mlflow_run.png and docs/img/dashboard.png are made).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow_server import MlflowServer

from ddsmon.readings import HEADLINE_READINGS, SCALAR_READINGS
from ddsmon.sinks.mlflow_keys import (
    CHECKPOINT_METRIC,
    LEGACY_CHECKPOINT_METRIC,
    event_tag_keys,
    event_tag_value,
    review_url,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
FACTORY = f"{REPO / 'tests' / 'fixtures_models.py'}:mlp"
EXPERIMENT = "review"
#: Chromium's own deadline for one command-line page load.
CLI_TIMEOUT_S = 120
SECTION_HEADER = "experiment-view-compare-runs-section-header"


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return exe


# ---------------------------------------------------------------------- the browser
def chromium_cli(
    url: str,
    profile: Path,
    *,
    screenshot: Path | None = None,
    size: tuple[int, int] = (1500, 1300),
    budget_ms: int = 30000,
    offline: bool = False,
) -> str:
    """One headless page load: its DOM after ``budget_ms`` of virtual time (or, with
    ``screenshot``, a PNG of the window written there). ``offline``: no host name
    resolves, so nothing can be fetched from the network."""
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
        f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={budget_ms}",
    ]  # fmt: skip
    if offline:
        cmd.append("--host-resolver-rules=MAP * ~NOTFOUND")
    cmd += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    out = subprocess.run(
        [*cmd, url], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False
    )
    if screenshot is not None:
        assert screenshot.is_file() and screenshot.stat().st_size > 0, out.stderr[-2000:]
    else:
        assert "<html" in out.stdout, f"no DOM from {url}: {out.stderr[-2000:]}"
    return out.stdout


class Devtools:
    """Chromium driven over the DevTools protocol on ``--remote-debugging-pipe`` (fd 3:
    commands in, fd 4: answers and events out, NUL-terminated JSON)."""

    def __init__(self, profile: Path, size: tuple[int, int] = (1500, 1300)) -> None:
        to_browser_r, self._out_w = os.pipe()
        self._in_r, from_browser_w = os.pipe()

        def fds() -> None:  # in the child: its fds 3 and 4
            a, b = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [
                _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}", "--remote-debugging-pipe", "about:blank",
            ],
            pass_fds=(3, 4), preexec_fn=fds, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        self._id = 0
        self._frames: dict[str, str] = {}
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        self.call("Page.enable", session=self.session)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False},
            session=self.session,
        )

    def call(self, method: str, params: dict[str, Any] | None = None, *, session: str = "") -> Any:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._out_w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._in_r, 1 << 20)
                if not chunk:
                    raise AssertionError("chromium closed its DevTools pipe")
                self._buf += chunk
            line, self._buf = self._buf.split(b"\0", 1)
            answer = json.loads(line)
            if answer.get("id") == self._id:  # events (no id) are skipped
                if "error" in answer:
                    raise AssertionError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def open(self, url: str) -> None:
        self.call("Page.navigate", {"url": url}, session=self.session)

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=self.session,
        )
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        """The value of ``expression`` once truthy (polled in real time)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not true after {timeout:.0f}s: {expression}")
            time.sleep(0.5)

    def in_frames(self, expression: str) -> list[Any]:
        """The value of ``expression`` in every frame of the page that runs in a process
        of its own (as a sandboxed frame of a blob does: MLflow's HTML artifact view)."""
        values = []
        for info in self.call("Target.getTargets")["targetInfos"]:
            if info["type"] != "iframe":
                continue
            session = self._frames.get(info["targetId"])
            if session is None:
                session = self.call(
                    "Target.attachToTarget", {"targetId": info["targetId"], "flatten": True}
                )["sessionId"]
                self._frames[info["targetId"]] = session
            result = self.call(
                "Runtime.evaluate",
                {"expression": expression, "returnByValue": True},
                session=session,
            )
            values.append(result.get("result", {}).get("value"))
        return values

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"}, session=self.session)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(os.getpgid(self.proc.pid), signal.SIGKILL)
            self.proc.wait(timeout=20)
        for fd in (self._out_w, self._in_r):
            try:
                os.close(fd)
            except OSError:
                pass


class _Sections(HTMLParser):
    """The chart sections' names in a dumped MLflow page, in page order."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self._inside = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if ("data-testid", SECTION_HEADER) in attrs:
            self._inside = True

    def handle_data(self, data: str) -> None:
        if self._inside and data.strip():
            self.names.append(data.strip())
            self._inside = False


def sections(dom: str) -> list[str]:
    parser = _Sections()
    parser.feed(dom)
    return parser.names


def _close_assistant(page: Devtools) -> None:
    """Close MLflow 3's assistant side panel (open in a fresh profile), for the picture."""
    page.evaluate(
        "for (const b of document.querySelectorAll("
        "'[data-component-id=\"mlflow.assistant.chat_panel.close\"]')) b.click(); true"
    )


def _keep(path: Path, name: str) -> None:
    """Copy a screenshot to $DDSMON_SCREENSHOTS (when set) as ``name``."""
    where = os.environ.get("DDSMON_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(where) / name)


# ---------------------------------------------------------------------- the run
def write_checkpoints(directory: Path, probe: Path) -> None:
    """20 checkpoints of the fixture MLP (steps 0..190), weights shrinking a little each
    step; from step 120 half of the hidden units are dead (a large negative bias), a
    phase change the events see. The trainer's ``val_acc`` and ``train_loss`` ride
    along, and the probe is saved beside."""
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_models import mlp, mlp_probe

    directory.mkdir(parents=True, exist_ok=True)
    model = mlp()
    for step in range(0, 200, 10):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.97)
            if step >= 120:
                model[0].bias[:8] = -50.0
        state = {k: v.clone() for k, v in model.state_dict().items()}
        meta = {"val_acc": min(1.0, step / 150), "train_loss": 1.5 * 0.98**step}
        tmp = directory / f".step_{step:06d}.pt.tmp"
        torch.save({"model": state, "step": step, **meta}, tmp)
        os.replace(tmp, directory / f"step_{step:06d}.pt")
    inputs, targets = mlp_probe()
    torch.save({"inputs": inputs, "targets": targets}, probe)


@dataclass
class Review:
    server: MlflowServer
    experiment_id: str
    run_id: str
    events: list[dict[str, Any]]
    root: Path

    def profile(self) -> Path:
        """A fresh browser profile: what a reviewer opening the link for the first time has."""
        return Path(tempfile.mkdtemp(prefix="chromium-", dir=self.root))


@pytest.fixture(scope="module")
def review(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Review]:
    from mlflow.tracking import MlflowClient

    _chromium()
    root = tmp_path_factory.mktemp("review")
    server = MlflowServer(root)
    server.start()
    try:
        client = MlflowClient(server.uri)
        # what the sink is to set on the experiments it creates (a colleague's change,
        # not in yet): set here so the test sees the run as it will be
        experiment_id = client.create_experiment(
            EXPERIMENT, tags={"mlflow.experimentKind": "custom_model_development"}
        )
        ckpts, probe, events_file = root / "ckpts", root / "probe.pt", root / "events.jsonl"
        write_checkpoints(ckpts, probe)
        result = subprocess.run(
            [
                sys.executable, "-m", "ddsmon.cli", "scan", str(ckpts), "--model", FACTORY,
                "--probe", str(probe), "--tracking-uri", server.uri,
                "--experiment", EXPERIMENT, "--events-json", str(events_file),
            ],
            capture_output=True, text=True, timeout=600, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
        runs = client.search_runs([experiment_id])
        assert len(runs) == 1, [r.info.run_id for r in runs]
        events = [json.loads(line) for line in events_file.read_text().splitlines() if line]
        assert events, f"the phase change raised no event:\n{result.stderr[-3000:]}"
        yield Review(server, experiment_id, runs[0].info.run_id, events, root)
    finally:
        server.stop()


# ---------------------------------------------------------------------- the tests
def test_the_review_link_opens_the_experiment_in_the_model_training_view(review: Review) -> None:
    url = review_url(review.server.uri, review.experiment_id)
    assert url is not None
    dom = chromium_cli(url, review.profile())
    title = re.search(r"<title>([^<]*)</title>", dom)
    assert title is not None and title.group(1).startswith("Runs - "), title  # not GenAI's
    assert "ddsmon ckpts" in dom  # the runs table, holding the run


def test_the_run_page_shows_the_events_and_headline_charts_first(review: Review) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(review.server.uri)
    logged = set(client.get_run(review.run_id).data.metrics)
    headline = [r for r in HEADLINE_READINGS if any(k.startswith(f"dds/{r}/") for k in logged)]
    assert {"lambda_ratio", "sigma_ratio", "log_volume"} <= set(headline), sorted(logged)
    assert CHECKPOINT_METRIC in logged and LEGACY_CHECKPOINT_METRIC not in logged
    url = review_url(review.server.uri, review.experiment_id, review.run_id, "model-metrics")
    assert url is not None
    names = sections(chromium_cli(url, review.profile()))
    first = [n for n in names if n == "dds/events" or n.startswith("dds/")]
    # the events and the headline readings, one section each, before anything else
    assert names[: len(first)] == first, names
    assert sorted(first) == sorted(["dds/events", *(f"dds/{r}" for r in headline)]), names
    rest = names[len(first) :]
    details = [n for n in rest if n.startswith("dds_detail/")]
    assert details and rest[: len(details)] == details, names  # then the details
    assert {f"dds_detail/{r}" for r in SCALAR_READINGS if r not in HEADLINE_READINGS} >= set(
        details
    ) - {"dds_detail/finite"}
    assert rest[len(details) :][:2] == ["ddsmon", "train"], names  # bookkeeping, the trainer

    page = Devtools(review.profile())
    try:
        page.open(url)
        # every chart of the first sections drawn (3 layers a section), not spinners
        page.wait_for("document.querySelectorAll('.js-plotly-plot').length >= 6", 120)
        _close_assistant(page)
        time.sleep(2.0)
        shot = page.screenshot(review.root / "mlflow_run.png")
        _keep(shot, "mlflow_run.png")
    finally:
        page.close()


def test_event_tags_say_kind_reading_step_layer_and_magnitude(review: Review) -> None:
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(review.server.uri).get_run(review.run_id).data.tags
    by_step: dict[int, list[dict]] = {}
    for e in review.events:
        by_step.setdefault(e["step"], []).append(e)
    keys = [
        key
        for batch in by_step.values()
        for key in event_tag_keys((e["step"], e["layer"], e["kind"], e["reading"]) for e in batch)
    ]
    assert len(set(keys)) == len(review.events)  # every event a tag of its own
    for key, e in zip(keys, [e for batch in by_step.values() for e in batch], strict=True):
        value = event_tag_value(
            e["step"], e["layer"], e["kind"], e["reading"], e["magnitude"], e["message"]
        )
        assert tags.get(key) == value, (key, tags.get(key))
        assert value.startswith(f"{e['kind']} of {e['reading']} | step {e['step']} | ")
    url = review_url(review.server.uri, review.experiment_id, review.run_id)
    assert url is not None
    dom = chromium_cli(url, review.profile())
    for e in review.events:  # the run's tag list shows what, when and where
        shown = f"{e['kind']} of {e['reading']} | step {e['step']} | layer {e['layer']}"
        assert shown in dom, shown


def test_the_dashboard_artifact_opens_offline_and_inline_with_its_plots(review: Review) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(review.server.uri)
    plots = {f.path for f in client.list_artifacts(review.run_id, "plots")}
    assert {"plots/dashboard.html", "plots/heatmaps"} <= plots, plots
    heatmaps = {f.path for f in client.list_artifacts(review.run_id, "plots/heatmaps")}
    assert {f"plots/heatmaps/{r}.png" for r in HEADLINE_READINGS} == heatmaps
    local = Path(client.download_artifacts(review.run_id, "plots/dashboard.html", str(review.root)))
    page = local.read_text(encoding="utf-8")
    markup = re.sub(r"<script\b[^>]*>.*?</script>", "<script></script>", page, flags=re.S)
    assert "<script></script>" in markup  # plotly.js and the data inlined ...
    assert not re.search(r"<script[^>]+src=|<link\b", markup)  # ... nothing to fetch

    # opened from disk with no network at all: every figure drawn
    dom = chromium_cli(local.as_uri(), review.profile(), budget_ms=20000, offline=True)
    for div in ("heatmap", "lines", "spectra", "events-plot", "train"):
        assert re.search(rf'<div id="{div}" class="plot js-plotly-plot"', dom), div
    assert dom.count('class="main-svg"') >= 5
    options = re.findall(r'<option value="([^"]+)">', dom)
    assert set(SCALAR_READINGS) <= set(options)
    assert options[: len(HEADLINE_READINGS)] == list(HEADLINE_READINGS)  # headline first
    assert len(re.findall(r"<tr><td", dom)) == len(review.events)  # the events table
    chromium_cli(local.as_uri(), review.profile(), screenshot=review.root / "dashboard_file.png")

    # and inline in MLflow's artifact viewer: a sandboxed frame that runs scripts
    url = review_url(
        review.server.uri, review.experiment_id, review.run_id, "artifacts/plots/dashboard.html"
    )
    assert url is not None
    viewer = Devtools(review.profile(), size=(1500, 1250))
    try:
        viewer.open(url)
        viewer.wait_for("document.querySelector('iframe.mlflow-html-iframe') !== null", 120)
        count = (
            "document.querySelectorAll('.js-plotly-plot .main-svg').length > 0 ? "
            "document.querySelectorAll('.js-plotly-plot').length : 0"
        )
        deadline = time.monotonic() + 120
        while max(viewer.in_frames(count), default=0) < 5:  # the page's five figures
            assert time.monotonic() < deadline, "the dashboard drew no plots in MLflow's viewer"
            time.sleep(1.0)
        _close_assistant(viewer)
        time.sleep(2.0)
        shot = viewer.screenshot(review.root / "dashboard.png")
        _keep(shot, "dashboard.png")
    finally:
        viewer.close()
