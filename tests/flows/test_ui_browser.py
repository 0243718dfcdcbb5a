"""The Prefect UI as a person sees it: headless Chromium opens the last run of a flow and its artifacts.

The session's real Prefect server also serves the UI. The test finds the newest completed
run of the flow that published artifacts through the REST API (a run left by
test_deployment.py is reused; otherwise the flow's `tiny` preset runs in-process with a
temporary store), then drives Debian's `chromium` through `chromedriver` (selenium, no
browser download) straight to `/runs/flow-run/<id>`, checks the run's page names the run,
the Artifacts tab lists the run's table/markdown artifact keys, the table artifact's page
shows a cell of the table, and (when the run has one) a markdown report's inline PNG is
decoded by the browser. Screenshots are written to `test-output/ui/` in the repo root
(git-ignored) and a copy to pytest's tmp dir; their paths are printed:

    .venv/bin/python -m pytest tests/flows/test_ui_browser.py -s          # baseline, ~60 s
    .venv/bin/python -m pytest tests/flows/test_ui_browser.py -s -m ""    # + experts (plot)
    # -> test-output/ui/baseline-flow-run.png, baseline-artifacts.png, baseline-table.png

The run-form test registers a `baseline` deployment and opens its custom-run form: the evaluation
net must be a drop-down of the net registry, with the field's description as help text
(`baseline-run-form.png`).

The browser is installed by scripts/install.sh (apt, as root); without it the test skips
and says why.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import time
import typing
from pathlib import Path

import httpx
import pytest

pytest.importorskip("selenium", reason="selenium missing: pip install -e '.[test]'")
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from flows.deployments import FLOWS
from flows.presets import load_preset
from tests.conftest import REPO, data_path

SCREENSHOTS = REPO / "test-output" / "ui"
# The flows whose UI is checked; the lead switches the fast one to `pipeline` once it exists.
# `experts` publishes a markdown report with an inline PNG plot, so it covers the image check.
UI_FLOWS = [
    "pipeline",
    pytest.param("baseline", marks=pytest.mark.slow),
    pytest.param("experts", marks=pytest.mark.slow),
]
WAIT_S = 45  # the UI is a single-page app: it renders after its own API calls return


def _binary(*names: str) -> str | None:
    return next((p for p in map(shutil.which, names) if p), None)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through the system chromedriver; skips only when they are truly absent."""
    from selenium import webdriver

    chrome = _binary("chromium", "chromium-browser", "google-chrome")
    driver_bin = _binary("chromedriver")
    if not chrome or not driver_bin:
        pytest.skip(
            f"no headless browser (chromium: {chrome}, chromedriver: {driver_bin}); "
            "install with scripts/install.sh as root or `apt-get install chromium chromium-driver`"
        )
    # Selenium Manager would try to download a driver when it is not told where ours is.
    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1440,1200",
        "--disable-extensions",
        "--no-first-run",
    ):
        options.add_argument(arg)  # --no-sandbox: Chromium refuses to run as root with its sandbox
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_bin))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _run_in_process(flow_name: str, store: Path) -> None:
    """Runs the flow's `tiny` preset in this process (faster than a deployment + worker)."""
    module, attr = FLOWS[flow_name]["entrypoint"].split(":")
    flow = getattr(importlib.import_module(module), attr)
    config_cls = typing.get_type_hints(flow.fn)["config"]
    params = {**load_preset(flow_name, "tiny"), "store": str(store)}
    flow(config_cls(**params))


def _last_run_with_artifacts(
    api: str, flow_name: str, wanted: typing.Callable[[list[dict]], bool] | None = None
) -> tuple[dict, list[dict]] | None:
    """The newest completed run of the flow that published artifacts (a fully cached re-run publishes none),
    and, with `wanted`, whose artifacts satisfy it (a partly cached re-run publishes only some)."""
    with httpx.Client(base_url=api, timeout=30) as client:
        runs = (
            client.post(
                "/flow_runs/filter",
                json={
                    "flows": {"name": {"any_": [flow_name]}},
                    "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
                    "sort": "START_TIME_DESC",
                    "limit": 20,
                },
            )
            .raise_for_status()
            .json()
        )
        for run in runs:
            artifacts = (
                client.post(
                    "/artifacts/filter",
                    json={
                        "artifacts": {"flow_run_id": {"any_": [run["id"]]}, "type": {"not_any_": ["result"]}},
                    },
                )
                .raise_for_status()
                .json()
            )
            if any(a.get("key") for a in artifacts) and (wanted is None or wanted(artifacts)):
                return run, artifacts
    return None


def _wait_for_text(driver, text: str, what: str) -> None:
    from selenium.common.exceptions import TimeoutException

    try:
        WebDriverWait(driver, WAIT_S, poll_frequency=0.5).until(
            lambda d: text in d.execute_script("return document.body ? document.body.innerText : ''")
        )
    except TimeoutException:
        shot = SCREENSHOTS / "failure.png"
        driver.save_screenshot(str(shot))
        body = driver.execute_script("return document.body ? document.body.innerText : ''")
        pytest.fail(
            f"{what}: {text!r} not shown after {WAIT_S}s at {driver.current_url} (screenshot {shot}); "
            f"page text: {body[:1500]!r}"
        )


def _settle(driver) -> None:
    """Lets the run page finish loading its logs and draw its timeline (a canvas, not in the DOM text).

    Only for a readable screenshot: nothing is asserted here.
    """
    from selenium.common.exceptions import TimeoutException

    try:
        WebDriverWait(driver, 5, poll_frequency=0.5).until(
            lambda d: "Waiting for logs" not in d.execute_script("return document.body.innerText")
        )
    except TimeoutException:
        pass
    time.sleep(2)


def _click_tab(driver, label: str) -> None:
    """Clicks a tab of the page by its visible label (the tab's route parameter is not stable across UI versions)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    # prefect-design renders tabs as <li class="p-tab"> inside a role=tablist; the rest are fallbacks.
    xpath = (
        f"//li[contains(@class,'p-tab')][normalize-space()='{label}'] | "
        f"//*[@role='tab'][normalize-space()='{label}'] | //button[normalize-space()='{label}']"
    )
    WebDriverWait(driver, WAIT_S, poll_frequency=0.5).until(ec.element_to_be_clickable((By.XPATH, xpath))).click()


def _scroll_to(driver, text: str) -> None:
    driver.execute_script(
        "const it = document.evaluate(`//*[normalize-space(text())='${arguments[0]}']`, document, null,"
        " XPathResult.FIRST_ORDERED_NODE_TYPE, null).singleNodeValue;"
        " if (it) it.scrollIntoView({block: 'start'});",
        text,
    )


def _screenshot(driver, name: str, tmp_path: Path) -> Path:
    path = SCREENSHOTS / name
    driver.save_screenshot(str(path))
    shutil.copy(path, tmp_path / name)
    assert path.stat().st_size > 10_000, f"{path} is suspiciously small: a blank page?"
    print(f"screenshot: {path}")
    return path


@pytest.mark.integration
@pytest.mark.parametrize("flow_name", UI_FLOWS)
def test_ui_shows_last_flow_run_and_its_artifacts(flow_name, prefect_server, browser, tmp_path):
    data_path("cifar10", "train.parquet")
    api = prefect_server
    found = _last_run_with_artifacts(api, flow_name)
    if found is None:
        _run_in_process(flow_name, tmp_path / "store")
        found = _last_run_with_artifacts(api, flow_name)
    assert found is not None, f"no completed {flow_name} run with artifacts on {api}"
    run, artifacts = found
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    ui = api.removesuffix("/api")

    # The run's page: the run name (Prefect's generated adjective-animal) in the header.
    browser.get(f"{ui}/runs/flow-run/{run['id']}")
    _wait_for_text(browser, run["name"], "flow-run page")
    _settle(browser)
    _screenshot(browser, f"{flow_name}-flow-run.png", tmp_path)

    # Its Artifacts tab lists every keyed report (table / markdown) the run published.
    keys = sorted({a["key"] for a in artifacts if a.get("key") and a["type"] in ("table", "markdown")})
    assert keys, f"the {flow_name} run published no table or markdown artifact"
    _click_tab(browser, "Artifacts")
    for key in keys:
        _wait_for_text(browser, key, "artifacts tab")
    _scroll_to(browser, "Task runs")  # the cards sit below the run's timeline
    _screenshot(browser, f"{flow_name}-artifacts.png", tmp_path)

    # A table artifact's own page renders the table: a cell value must be visible.
    tables = [a for a in artifacts if a["type"] == "table" and a.get("key")]
    assert tables, f"the {flow_name} run published no table artifact: {[(a['key'], a['type']) for a in artifacts]}"
    table = tables[0]
    browser.get(f"{ui}/artifacts/artifact/{table['id']}")
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]  # stored as JSON text
    cell = next((str(v) for r in rows if isinstance(r, dict) for v in r.values() if isinstance(v, str)), table["key"])
    _wait_for_text(browser, cell, "table artifact page")
    _screenshot(browser, f"{flow_name}-table.png", tmp_path)

    # Plots and image grids travel as markdown with inline PNGs: the browser must decode them.
    for art in [a for a in artifacts if a["type"] == "markdown" and "data:image/png" in (a.get("data") or "")][:1]:
        browser.get(f"{ui}/artifacts/artifact/{art['id']}")
        WebDriverWait(browser, WAIT_S, poll_frequency=0.5).until(
            lambda d: d.execute_script(
                "return [...document.images].some(i => i.src.startsWith('data:image/png') && i.naturalWidth > 0)"
            )
        )
        _screenshot(browser, f"{flow_name}-image.png", tmp_path)


@pytest.mark.integration
def test_ui_run_form_has_registry_drop_downs_and_field_descriptions(prefect_server, browser, tmp_path):
    """A deployment's custom-run form, as a person fills it: the evaluation net is a drop-down listing
    exactly the net registry, and a field's description is shown as its help text."""
    from distill.evaluate import EvalConfig
    from distill.nets import NETS
    from flows.baseline import baseline

    deployment_id = baseline.to_deployment(name="ui-run-form").apply()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.get(f"{prefect_server.removesuffix('/api')}/deployments/deployment/{deployment_id}/run")
    _wait_for_text(browser, EvalConfig.model_fields["net"].description, "run form (field description)")
    choices = browser.execute_script(
        "return [...document.querySelectorAll('select')].map(s => [...s.options].map(o => o.value))"
    )
    assert NETS.choices() in choices, f"no drop-down lists the nets {NETS.choices()}; the form's drop-downs: {choices}"
    _scroll_to(browser, "Net (Optional)")
    _screenshot(browser, "baseline-run-form.png", tmp_path)


@pytest.mark.integration
def test_ui_pipeline_report_heads_the_run_and_image_grids_are_readable(prefect_server, browser, tmp_path):
    """The pipeline's report is the flow run's own artifact (no task run), listed on the Artifacts tab
    before every task's card, and the distilled-image grid is drawn upscaled, not as a thumbnail strip."""
    data_path("cifar10", "train.parquet")
    data_path("tiny-imagenet-200", "train.parquet")

    def complete(artifacts: list[dict]) -> bool:  # a run that published its report and an image grid
        keys = [a.get("key") or "" for a in artifacts]
        return any(k.endswith("-report-plot") for k in keys) and any(k.startswith("distill-tm-") for k in keys)

    found = _last_run_with_artifacts(prefect_server, "pipeline", complete)
    if found is None:
        _run_in_process("pipeline", tmp_path / "store")
        found = _last_run_with_artifacts(prefect_server, "pipeline", complete)
    assert found is not None
    run, artifacts = found
    keyed = [a for a in artifacts if a.get("key")]
    report = next((a for a in keyed if a["key"].endswith("-report-plot")), None)
    assert report is not None, sorted(a["key"] for a in keyed)
    assert report["task_run_id"] is None, "the report must belong to the flow run itself, not to a task"
    task_keys = sorted({a["key"] for a in keyed if a["task_run_id"] is not None and a["type"] == "markdown"})
    assert task_keys

    ui = prefect_server.removesuffix("/api")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.get(f"{ui}/runs/flow-run/{run['id']}")
    _wait_for_text(browser, run["name"], "flow-run page")
    _click_tab(browser, "Artifacts")
    _wait_for_text(browser, report["key"], "artifacts tab")
    for key in task_keys:
        _wait_for_text(browser, key, "artifacts tab")
    text = browser.execute_script("return document.body.innerText")
    assert text.index(report["key"]) < min(text.index(k) for k in task_keys), "the report is not listed first"

    grid = next(a for a in keyed if a["key"].startswith("distill-tm-") and "data:image/png" in (a.get("data") or ""))
    browser.get(f"{ui}/artifacts/artifact/{grid['id']}")
    sizes = "return [...document.images].filter(i => i.alt === 'images').map(i => [i.naturalWidth, i.naturalHeight])"
    WebDriverWait(browser, WAIT_S, poll_frequency=0.5).until(lambda d: d.execute_script(sizes))
    (width, height), *_ = browser.execute_script(sizes)
    assert min(width, height) >= 64, f"the image grid is {width} x {height} px: too small to read"
    _screenshot(browser, "pipeline-image-grid.png", tmp_path)
