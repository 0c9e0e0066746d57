"""The studio in a real browser: headless Chromium (Selenium + chromedriver) against the app on a
local Ray cluster, with an MLflow sqlite registry of fake subjects (the tiny base plus seeded noise;
`bravo` has a ComFusion and a DreamBooth version).

Skips, saying why, where Chromium or chromedriver is missing (CI installs them: `.ci/run`).
"""
from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from browser_helpers import (WAIT_S, choose, click, images, make_browser, open_tab, pick, shot, sign_in, skip_reason,
                             wait_for)
from cluster_helpers import free_port, start_serve
from test_serve import Registry

pytestmark = pytest.mark.ray


# ---------------------------------------------------------------------------------------
# the app with a few fake subjects


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    reg = Registry(tmp_path_factory.mktemp("studio"))
    reg.add("alpha", noise_seed=1, identifier="sks", class_noun="dog")
    reg.add("bravo", noise_seed=2, identifier="zwx", class_noun="cat")
    add_dreambooth(reg, "bravo", noise_seed=3, identifier="zwx", class_noun="cat")
    reg.add("broken", noise_seed=4)  # its weights are damaged below: it fails to load
    source = Path(reg.client.get_model_version_by_alias("broken", "serving").source)
    weights = source / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    return reg


def add_dreambooth(reg: Registry, subject_id: str, noise_seed: int, identifier: str, class_noun: str) -> int:
    """A second version of the subject, trained (fake) with the DreamBooth method: alias `dreambooth`."""
    from jobs.tracking import register_checkpoint

    folder = reg.checkpoint(subject_id, noise_seed, identifier, class_noun)
    run = reg.client.create_run(reg.experiment)
    version = register_checkpoint(reg.client, run.info.run_id, folder, subject_id, "dreambooth")
    reg.client.set_terminated(run.info.run_id)
    return version


@pytest.fixture(scope="module")
def app_url(registry, api_key):
    """The app (one replica of each deployment) on a local Ray cluster, Serve on a free port."""
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    import ray
    from ray import serve

    from serve.app import make_app
    from serve.settings import ServeSettings

    settings = ServeSettings(base="tiny", tracking_uri=registry.uri, cache_dir=str(registry.root / "cache"),
                             api_keys_file=api_key.file, default_steps=2, device="cpu", registry_ttl_s=1.0,
                             lookup_wait_s=10.0, votes_url=f"sqlite:///{registry.root}/votes.db",
                             ray_address=f"http://127.0.0.1:{free_port()}")  # no job API: Train says so
    port = start_serve()
    app = make_app(settings, generator_options=dict(num_replicas=1, ray_actor_options={"num_cpus": 0.25}),
                   ingress_options=dict(num_replicas=1, ray_actor_options={"num_cpus": 0.25}))
    try:
        serve.run(app, name="comfusion", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300  # the replica builds the studio in the background (Gradio's import)
        while (r := httpx.get(f"{url}/studio/", timeout=60)).status_code == 503:
            assert r.headers.get("retry-after") and time.monotonic() < deadline, "the studio did not start"
            time.sleep(1)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


# ---------------------------------------------------------------------------------------
# the browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    driver = make_browser()
    yield driver
    path = tmp_path_factory.getbasetemp() / "studio-last-page.png"  # what the page showed last, for a failure
    driver.save_screenshot(str(path))
    print(f"last page: {path}")
    driver.quit()


# ---------------------------------------------------------------------------------------
# tests


def test_studio_needs_a_key(app_url, api_key):
    with httpx.Client(base_url=app_url, timeout=60) as http:
        page = http.get("/studio/")
        assert page.status_code == 200 and 'name="key"' in page.text  # the sign-in form, nothing else
        assert http.get("/studio/config").status_code == 401
        assert http.get("/studio/export/votes.csv").status_code == 401
        bad = http.post("/studio/login", data={"key": "cfk_not-a-key"})
        assert bad.status_code == 401 and "not valid" in bad.text
        assert http.get("/healthz").status_code == 200 and http.get("/docs").status_code == 200  # the app is as it was
        assert http.get("/v1/subjects", headers=api_key.headers).status_code == 200


def test_studio_generates_compares_votes_and_counts(app_url, browser, api_key):
    key = api_key.headers["Authorization"].removeprefix("Bearer ")
    sign_in(browser, app_url, key)

    # Generate: the first subject is chosen; two images appear with their prompt and seed
    wait_for(browser, "#gen-subject input")
    click(browser, "#gen-go")
    wait_for(browser, "#generated img")
    cards = browser.find_element("css selector", "#generated").text
    assert "a sks dog in the snow" in cards and "seed 0" in cards
    assert len(images(browser, "#generated img")) == 1
    shot(browser, "generate")

    # a subject that fails to load: a message naming it, no stack trace
    pick(browser, "gen-subject", "broken")
    click(browser, "#gen-go")
    status = wait_for(browser, "#gen-status", text="could not be rendered").text
    assert "broken" in status and "sha256" in status and "Traceback" not in status

    # Compare: bravo's two versions, 15 scenes each, and both method labels
    open_tab(browser, "Compare")
    pick(browser, "cmp-subject", "bravo")
    click(browser, "#cmp-go")
    wait_for(browser, "#cmp-grid")
    labels = [el.text.split("\n")[0] for el in browser.find_elements("css selector", "#cmp-grid th.cmp-method")]
    assert labels == ["comfusion", "dreambooth"]
    assert len(images(browser, "#cmp-grid td img.studio-img:not(#cmp-photo)")) == 2 * 15
    shot(browser, "compare")

    # Vote: three blind pairs, both questions each
    open_tab(browser, "Vote")
    click(browser, "#vote-new")
    for i in range(3):
        wait_for(browser, "#vote-left")
        first = browser.find_element("css selector", "#vote-left").get_attribute("src")
        choose(browser, "vote-text", "left")
        choose(browser, "vote-subject", "right")
        if i == 0:
            shot(browser, "vote")
        click(browser, "#vote-submit")
        wait_for(browser, "#vote-status", text=f"Vote counted ({i + 1} in all)")
        deadline = time.monotonic() + WAIT_S  # the next pair replaces this one
        while browser.find_element("css selector", "#vote-left").get_attribute("src") == first:
            assert time.monotonic() < deadline
            time.sleep(0.3)

    # Results: three votes, one method pair; the CSV export has them too
    open_tab(browser, "Results")
    click(browser, "#res-refresh")
    assert wait_for(browser, "#res-count").text == "3"
    votes = [int(el.text) for el in browser.find_elements("css selector", "#res-rows td.res-votes")]
    assert votes and max(votes) == 3
    assert images(browser, "#res-chart-img")
    shot(browser, "results")
    cookies = {c["name"]: c["value"] for c in browser.get_cookies()}
    with httpx.Client(base_url=app_url, timeout=60, cookies=cookies) as http:
        csv_text = http.get("/studio/export/votes.csv").text
    assert csv_text.count("\n") == 4 and "comfusion" in csv_text and "dreambooth" in csv_text


def test_studio_fits_a_phone(app_url, api_key):
    driver = make_browser(390, 844)
    try:
        sign_in(driver, app_url, api_key.headers["Authorization"].removeprefix("Bearer "))
        wait_for(driver, "#gen-go")
        overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 2, f"the page is {overflow} px wider than a phone"
        shot(driver, "phone")
        # the Train page fits too, and says plainly that this app has no training (no Ray job API here)
        open_tab(driver, "Train")
        note = wait_for(driver, "#train-note", text="not available").text
        assert "Ray job API" in note and "Traceback" not in note
        wait_for(driver, "#train-start")
        overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 2, f"the Train page is {overflow} px wider than a phone"
    finally:
        driver.quit()
