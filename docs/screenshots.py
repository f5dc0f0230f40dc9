"""Screenshots of what a person sees: MLflow runs list, run page and compare view, a Prefect flow run, DVC plots.

    source scripts/env.sh
    python docs/screenshots.py                    # the local MLflow UI, Prefect server and dvc_plots/index.html
    python docs/screenshots.py --out /tmp/shots   # elsewhere
    python docs/screenshots.py --pages deployment --prefect http://127.0.0.1:4300   # some pages only

Needs the MLflow UI (`bash scripts/mlflow-ui.sh`) and the Prefect server (`python -m flows.server`)
running, some pipeline runs in them, and `dvc plots show` run once. The README's pictures were made
in a fresh clone after `python -m flows.pipeline`, `--set train.lr=0.01` and `--set build.model=mlp`;
the deployment's, in a fresh clone after `scripts/deploy.sh`, a worker, `scripts/retrain.sh
train.epochs=20` and `scripts/retrain.sh train.lr=10` (which diverges); the sweep's, after
`bash scripts/sweep.sh sweeps/lr.yaml` into an empty MLflow store (`--pages sweep`); the registry's,
after three committed runs of `dvc repro` (3, 10 and 2 epochs: champion, champion, challenger;
`--pages registry`); the reproduction's, after `python -m tasks.reproduce RUN_ID` of the last
pipeline run (`--pages reproduction`); the scoring run's, after `python -m flows.score` on the test
images written as PNG files and one file that is not an image (`--pages score`).

Headless Chromium (`apt-get install chromium`) is driven through its DevTools protocol, with the
`websockets` package that Prefect already brings: each page is opened in a fresh profile, given
time to draw, and MLflow's assistant panel, which opens by itself on a first visit, is closed.
The DVC page is opened with every network request refused, as a user without a network would.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Browser:
    """One headless Chromium, one tab, spoken to over the DevTools protocol."""

    def __init__(self, width: int, height: int, offline: bool = False) -> None:
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="chromium-")
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={self.profile}"]
        if offline:  # every request through a proxy that does not exist: nothing from the network can load
            args += ["--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]
        self.process = subprocess.Popen(
            [shutil.which("chromium") or "chromium", *args, "--remote-debugging-port=0", "about:blank"],
            stderr=subprocess.PIPE,
            text=True,
        )
        port = self._port()
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        target = next(p for p in pages if p["type"] == "page")
        self.socket = connect(target["webSocketDebuggerUrl"], max_size=None)
        self.ids = itertools.count(1)
        self.size(width, height)

    def size(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _port(self) -> int:
        for line in self.process.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
            if "DevTools listening on" in line:
                return int(line.split("127.0.0.1:")[1].split("/")[0])
        raise RuntimeError("chromium did not start; install it with: apt-get install -y chromium")

    def call(self, method: str, **params) -> dict:
        ident = next(self.ids)
        self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True).get("result", {}).get("value")

    def open(self, url: str, until: str, settle: float = 2.0, timeout: float = 60, ready: str | None = None) -> None:
        """Go to `url`, wait until it shows the text `until` (or the JS `ready` holds), then `settle` seconds."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        ready = ready or f"document.body && document.body.innerText.includes({json.dumps(until)})"
        while not self.js(ready):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not show {until!r} within {timeout} s")
            time.sleep(0.5)
        time.sleep(settle)

    def click(self, selector: str) -> bool:
        return bool(self.js(f"(e => e ? (e.click(), true) : false)(document.querySelector({json.dumps(selector)}))"))

    def click_text(self, text: str, until: str, settle: float = 3.0, timeout: float = 30) -> None:
        """Click the innermost element whose text is `text` (a tab), then wait for `until` to show."""
        self.js(
            "(t => { const all = [...document.querySelectorAll('body *')]"
            ".filter(e => (e.innerText || '').trim() === t); if (all.length) all[all.length - 1].click(); })"
            f"({json.dumps(text)})"
        )
        self.wait(until, settle, timeout, f"clicking {text!r}")

    def wait(self, until: str, settle: float = 3.0, timeout: float = 30, after: str = "the page") -> None:
        """Wait until the page shows the text `until`, then `settle` seconds."""
        deadline = time.monotonic() + timeout
        while not self.js(f"document.body.innerText.includes({json.dumps(until)})"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{after} did not show {until!r} within {timeout} s")
            time.sleep(0.5)
        time.sleep(settle)

    def select(self, value: str, until: str, settle: float = 3.0) -> None:
        """Pick `value` in the native <select> that offers it (a sort order, a filter), then wait for `until`."""
        self.js(
            "(v => { const s = [...document.querySelectorAll('select')]"
            ".find(s => [...s.options].some(o => o.value === v));"
            " if (s) { s.value = v; s.dispatchEvent(new Event('change', {bubbles: true})); } })"
            f"({json.dumps(value)})"
        )
        self.wait(until, settle, after=f"picking {value!r}")

    def shot(self, path: Path) -> None:
        """Save the page as a PNG of 256 colours: a third of the bytes in git, the same to the eye for these UIs."""
        from PIL import Image

        data = self.call("Page.captureScreenshot", format="png")["data"]
        image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
        image.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        print(f"{path} ({path.stat().st_size // 1024} KiB)")

    def close(self) -> None:
        self.socket.close()
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def mlflow_pages(mlflow: str, out: Path) -> None:
    from tasks import tracking

    c = tracking.client()
    experiment = c.get_experiment_by_name(tracking.experiment_name())
    runs = c.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=3)
    ids = [r.info.run_id for r in runs]
    names = [r.info.run_name for r in runs]
    mode = tracking.UI_MODE
    browser = Browser(1600, 1000)
    try:
        browser.open(tracking.runs_list_url(experiment.experiment_id, mlflow), until=names[0], settle=4)
        # A first visit opens the assistant panel over a third of the page: close it (the UI remembers).
        browser.click('[data-component-id="mlflow.assistant.chat_panel.close"]')
        time.sleep(1)
        browser.shot(out / "mlflow-runs.png")
        run_page = f"{mlflow}/#/experiments/{experiment.experiment_id}/runs/{ids[0]}"
        browser.size(1600, 1400)  # the test metrics' row, then the curves
        browser.open(f"{run_page}/model-metrics?{mode}", until=names[0], settle=8)
        browser.shot(out / "mlflow-run-curves.png")
        browser.size(1600, 1000)
        browser.open(f"{run_page}?{mode}", until="Description", settle=3)
        browser.shot(out / "mlflow-run.png")
        runs_arg = urllib.request.quote(json.dumps(ids))
        experiments_arg = urllib.request.quote(json.dumps([experiment.experiment_id]))
        browser.open(f"{mlflow}/#/compare-runs?runs={runs_arg}&experiments={experiments_arg}&{mode}", until=names[-1])
        browser.shot(out / "mlflow-compare.png")
    finally:
        browser.close()


def prefect_page(prefect: str, out: Path) -> None:
    from prefect import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        latest = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
    browser = Browser(1600, 1000)
    try:
        browser.open(f"{prefect}/runs/flow-run/{latest.id}", until="export", settle=4)
        browser.shot(out / "prefect-flow-run.png")
        browser.click_text("Artifacts", until="pipeline-results")
        browser.click_text("pipeline-results", until="test metric")
        browser.shot(out / "prefect-results.png")
    finally:
        browser.close()


def deployment_pages(prefect: str, out: Path) -> None:
    """The `retrain` deployment (its schedule and runs), and its latest failed run (the task that failed)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("pipeline/retrain")
        failed = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=dict(type=FlowRunFilterStateType(any_=[StateType.FAILED]))),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
    browser = Browser(1600, 1000)
    try:
        browser.open(f"{prefect}/deployments/deployment/{deployment.id}", until="retrain", settle=4)
        browser.shot(out / "prefect-deployment.png")
        if failed:
            browser.open(f"{prefect}/runs/flow-run/{failed[0].id}", until="diverged", settle=4)
            browser.select("TIMESTAMP_DESC", until="taken back")  # the logs newest first: how it ended
            browser.shot(out / "prefect-failed-run.png")
    finally:
        browser.close()


def sweep_pages(urls: tuple[str, str], out: Path) -> None:
    """The latest sweep: its parent and nested runs in MLflow's runs list, their compare view, its Prefect flow run."""
    from mlflow import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    from tasks.tracking import UI_MODE, experiment_name, runs_list_url, tracking_uri

    mlflow, prefect = urls
    c = MlflowClient(tracking_uri())
    experiment = c.get_experiment_by_name(experiment_name())
    (parent,) = c.search_runs(
        [experiment.experiment_id], "tags.`sweep.key` != ''", order_by=["attributes.start_time DESC"], max_results=1
    )
    children = c.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    with get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="sweep ")),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
    browser = Browser(1600, 800)
    try:
        browser.open(runs_list_url(experiment.experiment_id, mlflow), until=parent.info.run_name, settle=4)
        browser.click('[data-component-id="mlflow.assistant.chat_panel.close"]')
        browser.click('button[data-component-id$="runnamecellrenderer.tsx_46"]')  # the parent's expand (+) button
        browser.wait(children[0].info.run_name)
        browser.shot(out / "mlflow-sweep.png")
        ids = urllib.request.quote(json.dumps([r.info.run_id for r in children]))
        experiments = urllib.request.quote(json.dumps([experiment.experiment_id]))
        browser.size(1600, 1000)
        browser.open(f"{mlflow}/#/compare-runs?runs={ids}&experiments={experiments}&{UI_MODE}", until="train.lr")
        browser.shot(out / "mlflow-sweep-compare.png")
        browser.open(f"{prefect}/runs/flow-run/{flow_run.id}", until="trial 4", settle=4)
        browser.shot(out / "prefect-sweep.png")
    finally:
        browser.close()


def score_pages(prefect: str, out: Path) -> None:
    """The latest batch-scoring run: its tasks, and its `score-summary` artifact (counts, timings, failed files)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (latest,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["score"])), sort=FlowRunSort.START_TIME_DESC, limit=1
        )
    browser = Browser(1600, 1000)
    try:
        browser.open(f"{prefect}/runs/flow-run/{latest.id}", until="files scored", settle=4)
        browser.shot(out / "prefect-score-run.png")
        browser.click_text("Artifacts", until="score-summary")
        browser.click_text("score-summary", until="could not be scored")
        browser.shot(out / "prefect-score-summary.png")
    finally:
        browser.close()


def registry_pages(mlflow: str, out: Path) -> None:
    """The registered model's versions and aliases, and the champion's run page (its data sets and registry)."""
    from tasks import tracking

    c = tracking.client()
    champion = c.get_model_version_by_alias("classifier", "champion")
    run = c.get_run(champion.run_id)
    browser = Browser(1600, 900)
    try:
        browser.open(f"{mlflow}/#/models/classifier?{tracking.UI_MODE}", until="Version 3", settle=4)
        browser.click('[data-component-id="mlflow.assistant.chat_panel.close"]')
        time.sleep(1)
        browser.shot(out / "mlflow-registry.png")
        browser.size(1600, 1300)
        page = f"{mlflow}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?{tracking.UI_MODE}"
        browser.open(page, until="digits-train", settle=4)
        browser.shot(out / "mlflow-run-lineage.png")
    finally:
        browser.close()


def reproduction_page(mlflow: str, out: Path) -> None:
    """The latest reproduction's run page: its name, note and `reproduction.*` tags beside the first run's."""
    from tasks import tracking

    c = tracking.client()
    experiment = c.get_experiment_by_name(tracking.experiment_name()).experiment_id
    (run,) = c.search_runs([experiment], "tags.`reproduction.of` != ''", order_by=["attributes.start_time DESC"],
                           max_results=1)  # fmt: skip
    browser = Browser(1600, 1200)
    try:
        page = f"{mlflow}/#/experiments/{experiment}/runs/{run.info.run_id}?{tracking.UI_MODE}"
        browser.open(page, until="(reproduction)", settle=4)
        browser.click('[data-component-id="mlflow.assistant.chat_panel.close"]')
        time.sleep(1)
        browser.shot(out / "mlflow-reproduction.png")
    finally:
        browser.close()


def plots_page(page: Path, out: Path) -> None:
    browser = Browser(1400, 1700, offline=True)
    try:
        charts = "document.querySelectorAll('.vega-embed canvas, .vega-embed svg.marks').length >= 4"
        browser.open(page.resolve().as_uri(), until="4 charts", ready=charts, settle=3)
        browser.shot(out / "dvc-plots.png")
    finally:
        browser.close()


PAGES = {
    "mlflow": mlflow_pages,
    "prefect": prefect_page,
    "deployment": deployment_pages,
    "sweep": sweep_pages,
    "registry": registry_pages,
    "score": score_pages,
    "reproduction": reproduction_page,
    "plots": plots_page,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mlflow", default="http://127.0.0.1:5000", help="the MLflow UI (default: %(default)s)")
    parser.add_argument("--prefect", default="http://127.0.0.1:4200", help="the Prefect UI (default: %(default)s)")
    parser.add_argument("--plots", type=Path, default=Path("dvc_plots/index.html"), help="`dvc plots show`'s page")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go (default: docs/)")
    parser.add_argument("--pages", nargs="+", choices=PAGES, default=list(PAGES), help="which pages (default: all)")
    args = parser.parse_args()
    os.environ["PREFECT_API_URL"] = args.prefect.rstrip("/") + "/api"  # before Prefect reads its settings
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.pages:
        mlflow, prefect = args.mlflow.rstrip("/"), args.prefect.rstrip("/")
        sources = {"mlflow": mlflow, "registry": mlflow, "reproduction": mlflow, "plots": args.plots,
                   "sweep": (mlflow, prefect)}  # fmt: skip
        source = sources.get(name, prefect)
        PAGES[name](source, args.out)


if __name__ == "__main__":
    main()
