"""Browser helpers the studio's browser tests share: headless Chromium driven by Selenium, signing
in, waiting, clicking, Gradio dropdowns, and the README's screenshots (`STUDIO_SCREENSHOTS`)."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

CHROMIUM = next((p for p in (os.environ.get("CHROME_BIN"), "/usr/bin/chromium", shutil.which("chromium"),
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p and Path(p).exists()), None)
DRIVER = next((p for p in (os.environ.get("CHROMEDRIVER"), "/usr/bin/chromedriver", shutil.which("chromedriver"))
               if p and Path(p).exists()), None)
WAIT_S = 180  # the shared 2-core box: a first render loads a subject into the Generator


def skip_reason() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if CHROMIUM is None or DRIVER is None:
        return ("no Chromium + chromedriver on this machine (Debian: apt-get install chromium chromium-driver; "
                ".ci/run installs them)")
    return None


def make_browser(width: int = 1280, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    return driver


def wait_for(driver, css: str, timeout: float = WAIT_S, text: str | None = None):
    """The first element matching `css` that is displayed (and contains `text`), waiting for it."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            for el in driver.find_elements("css selector", css):
                if el.is_displayed() and (text is None or text in el.text):
                    return el
        except StaleElementReferenceException:
            pass
        assert time.monotonic() < deadline, f"no {css!r}{f' with {text!r}' if text else ''} within {timeout} s"
        time.sleep(0.3)


def sign_in(driver, url: str, key: str) -> None:
    driver.get(f"{url}/studio/")
    wait_for(driver, "#key").send_keys(key)
    driver.find_element("css selector", "#sign-in").click()
    wait_for(driver, "#who", text="signed in as")


def open_tab(driver, name: str) -> None:
    """Click the tab `name`; on a narrow screen Gradio moves tabs that do not fit into a "..." menu."""
    for tab in driver.find_elements("css selector", "button[role='tab']"):
        if tab.text.strip() == name and tab.is_displayed():
            tab.click()
            return
    for menu in driver.find_elements("css selector", ".overflow-menu button"):
        if menu.is_displayed():
            menu.click()
            break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for item in driver.find_elements("css selector", ".overflow-dropdown button"):
            if item.text.strip() == name and item.is_displayed():
                item.click()
                return
        time.sleep(0.2)
    raise AssertionError(f"no tab {name!r}")


def click(driver, css: str) -> None:
    el = wait_for(driver, css)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
    el.click()


def pick(driver, elem_id: str, option: str) -> None:
    """Choose `option` in a Gradio dropdown."""
    click(driver, f"#{elem_id} input")
    click(driver, f"#{elem_id} li[aria-label='{option}']")
    deadline = time.monotonic() + 30
    while driver.find_element("css selector", f"#{elem_id} input").get_attribute("value") != option:
        assert time.monotonic() < deadline, f"{elem_id}: {option!r} not chosen"
        time.sleep(0.2)


def choose(driver, elem_id: str, side: str) -> None:
    click(driver, f"#{elem_id} input[value='{side}']")


def shot(driver, name: str) -> None:
    """With STUDIO_SCREENSHOTS=<folder>: save the page as <folder>/studio-<name>.png (the README's pictures),
    made small: at most 900 px wide, 64 colours."""
    folder = os.environ.get("STUDIO_SCREENSHOTS")
    if not folder:
        return
    from PIL import Image

    time.sleep(1)  # let the last update paint
    path = Path(folder) / f"studio-{name}.png"
    driver.save_screenshot(str(path))
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.width > 900:
            im = im.resize((900, round(im.height * 900 / im.width)), Image.Resampling.LANCZOS)
        im.quantize(64).save(path, optimize=True)


def images(driver, css: str) -> list:
    return [el for el in driver.find_elements("css selector", css) if el.get_attribute("src").startswith("data:image/png")]
