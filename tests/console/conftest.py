"""The console in a real headless Chromium: Debian's ``chromium`` and ``chromium-driver``
(installed by ``scripts/chromium``) named by path, so Selenium never looks for, downloads or
reports anything; a real ``modelcd serve`` per module; signing in through /ui/login.

Screenshots: ``shot(driver, name)`` saves ``name.png`` into a temporary folder, and with
``MODELCD_SCREENSHOTS=1`` also into ``docs/console/`` (the pictures in docs/console.md are made
so: ``MODELCD_SCREENSHOTS=1 python3 -m pytest tests/console``)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.conftest import TOKEN, Service

os.environ["SE_AVOID_STATS"] = "true"  # before selenium is imported: no usage statistics sent

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DOCS_SHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
WINDOW = (1280, 900)


def _require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        why = f"{', '.join(missing)} missing: run scripts/chromium (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


def new_driver() -> Any:
    """Headless Chromium at a fixed size, driven by Debian's chromedriver (paths named: Selenium
    Manager is never asked for anything)."""
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--metrics-recording-only", "--lang=en-US"):
        options.add_argument(arg)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
    driver = webdriver.Chrome(service=DriverService(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    return driver


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    d = new_driver()
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture(scope="session")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Any, str], Path]:
    folder = tmp_path_factory.mktemp("console-shots")
    publish = os.environ.get("MODELCD_SCREENSHOTS") == "1"

    def shot(driver: Any, name: str) -> Path:
        """Save the whole page (the window grown to the page's height, at most 2,400 px) as ``name``.png."""
        height = min(int(driver.execute_script("return document.documentElement.scrollHeight")), 2400)
        driver.set_window_size(WINDOW[0], max(WINDOW[1], height))
        try:
            path = folder / f"{name}.png"
            assert driver.save_screenshot(str(path)), name
        finally:
            driver.set_window_size(*WINDOW)
        if publish:
            DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, DOCS_SHOTS / path.name)
        return path

    return shot


def sign_in(driver: Any, svc: Service, token: str = TOKEN, then: str = "/ui/models") -> None:
    """Sign out whoever was signed in, then sign in with ``token`` through the login form."""
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(f"{svc.url}/ui/login?next={then}")
    driver.find_element(By.CSS_SELECTOR, "input#token[name=token]").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "button#sign-in").click()
    wait_for(driver, lambda d: d.current_url.startswith(f"{svc.url}{then}"), "the page after signing in")


def wait_for(driver: Any, condition: Callable[[Any], Any], what: str, timeout_s: float = 30) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(condition, f"waited {timeout_s}s for {what}")


def user_token(svc: Service, name: str, role: str) -> str:
    """A new user with ``role`` and an API token of theirs, made with the CLI as an admin would."""
    from modelcd.cli import main

    result = CliRunner().invoke(main, ["users", "add", name, "--role", role], env=svc.env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["tokens", "create", "--user", name, "--json"], env=svc.env,
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return str(json.loads(result.stdout)["token"])

