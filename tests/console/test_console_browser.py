"""The console driven in a real headless Chromium against a real `modelcd serve` (issue 12's
"Must show"): sign in with a token; models → version → Deploy, and the release page following
the stages live to production; Stop of a running canary from the jobs page; an approval gate
answered by an `approver`, whose name the events show; a `viewer` who sees no actions and whose
writes the API refuses; a dead letter retried from the inbox page; and in the browser: the
session cookie's flags, CSRF, an XSS probe rendering inert, and no token in a page, a URL or a log;
and the pages used by keyboard alone and at 200 % zoom.

The tests share one service and run in order (the canary stopped is the deployed model's next
version)."""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.conftest import TOKEN, Service, iris_model, make_service, wait_until
from tests.console.conftest import new_driver, sign_in, user_token, wait_for
from tests.e2e.test_hooks import SECRET, _aws_env, _echo_model, _post, _upload, moto

__all__ = ["moto"]  # a fixture (a real S3 API on loopback) used here

POLICIES = ("""\
name: console-canary
match:
  models: ["cs-*"]
auto: false
environments:
  - name: production
    strategy: canary
    steps: [50, 100]
    step_hold_s: 120
smoke:
  requests: 3
""", """\
name: console-gated
match:
  models: ["cg-*"]
environments:
  - name: production
    approval: true
smoke:
  requests: 3
""")
TERMINAL = ("succeeded", "failed", "cancelled", "superseded")
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'


class Console:
    """The service, the tokens of its users (for the checks that none leaks) and a browser helper."""

    def __init__(self, svc: Service, s3: Any) -> None:
        self.svc, self.s3 = svc, s3
        self.tokens = {"admin": TOKEN}

    def user(self, name: str, role: str) -> str:
        if name not in self.tokens:
            self.tokens[name] = user_token(self.svc, name, role)
        return self.tokens[name]

    def open(self, driver: Any, path: str) -> None:
        """Go to ``path``; the page and its URL must hold no token of anyone."""
        driver.get(self.svc.url + path)
        self.no_token_in(driver)

    def no_token_in(self, driver: Any) -> None:
        for who, token in self.tokens.items():
            assert token not in driver.current_url, f"{who}'s token in the URL {driver.current_url}"
            assert token not in driver.page_source, f"{who}'s token in the page {driver.current_url}"

    def actions(self, driver: Any) -> list[str]:
        """The actions the page offers (the sign-out button aside)."""
        return [b.get_attribute("data-action") for b in driver.find_elements(By.CSS_SELECTOR, "[data-action]")
                if b.get_attribute("data-action") != "sign-out"]


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, moto: str) -> Iterator[Console]:
    import boto3

    env = _aws_env(moto)
    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1", aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    try:
        s3.create_bucket(Bucket="models")
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    # reads closed: every page needs a session (open reads show pages read-only: tests/app/test_console.py)
    svc = make_service(tmp_path_factory.mktemp("console-svc"), MODELCD_HOOKS_GENERIC_SECRET=SECRET,
                       MODELCD_OPEN_READS="false", **env)
    svc.start()
    try:
        for policy in POLICIES:
            svc.apply_policy(policy)
        yield Console(svc, s3)
    finally:
        svc.stop()  # first, or it would start again the deployments the data plane's shutdown stops
        svc.shutdown_data_plane()


def _flash(driver: Any) -> str:
    return str(wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#flash[role=status]"), "the flash")[0].text)


def _phase(driver: Any) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, "span#release-phase").get_attribute("data-phase"))


def _release_of(svc: Service, model: str, version: int) -> dict[str, Any]:
    rel = svc.client.find_release(model, version)
    assert rel is not None, f"no release of {model} v{version}"
    return rel


def test_the_browser_is_debian_chromium_and_selenium_manager_is_not_asked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="selenium.webdriver.common.driver_finder")
    d = new_driver()
    try:
        assert d.capabilities["browserName"] == "chrome" and d.capabilities["browserVersion"]
        major = d.capabilities["browserVersion"].split(".")[0]
        assert d.capabilities["chrome"]["chromedriverVersion"].startswith(f"{major}."), d.capabilities
    finally:
        d.quit()
    assert "Skipping Selenium Manager" in caplog.text and os.environ["SE_AVOID_STATS"] == "true"


def test_sign_in_with_a_token_and_the_session_cookie(console: Console, driver: Any) -> None:
    svc = console.svc
    driver.delete_all_cookies()
    console.open(driver, "/ui/jobs")  # not signed in: the login page, which returns here after
    assert "/ui/login" in driver.current_url and "next=/ui/jobs" in driver.current_url
    driver.find_element(By.CSS_SELECTOR, "input#token[name=token]").send_keys("not-a-token-of-anyone-here")
    driver.find_element(By.CSS_SELECTOR, "button#sign-in").click()
    assert "not valid" in driver.find_element(By.ID, "login-error").text
    assert driver.get_cookies() == []

    sign_in(driver, svc, TOKEN, then="/ui/jobs")
    console.no_token_in(driver)
    cookies = {c["name"]: c for c in driver.get_cookies()}
    session = cookies["modelcd_session"]
    assert session["httpOnly"] is True and session["sameSite"] == "Strict" and session["path"] == "/ui", session
    assert TOKEN not in json.dumps(cookies)
    assert driver.execute_script("return document.cookie") == ""  # not readable by a script
    assert driver.find_element(By.ID, "principal").get_attribute("data-role") == "admin"
    nav = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "header nav ul a")]
    assert nav == ["Models", "Releases", "Endpoints", "Jobs", "Inbox", "Policies"]

    driver.find_element(By.CSS_SELECTOR, "button[data-action=sign-out]").click()
    wait_for(driver, lambda d: "/ui/login" in d.current_url, "the login page after signing out")
    r = requests.get(f"{svc.url}/ui/models", cookies={"modelcd_session": session["value"]}, allow_redirects=False,
                     timeout=10)
    assert r.status_code == 303 and "/ui/login" in r.headers["Location"]  # the session ended on the server


def test_deploy_from_the_console_and_follow_the_release_live(console: Console, driver: Any, tmp_path: Path,
                                                             shots: Callable[[Any, str], Path]) -> None:
    svc = console.svc
    v = svc.register("cs-live", tmp_path / "v1", {**iris_model(tmp_path / "v1"), "tags": {"team": "fraud"},
                                                  "description": "iris, first try"})
    assert svc.client.find_release("cs-live", v["version"]) is None  # auto: false, nothing released yet
    sign_in(driver, svc, console.user("dana", "deployer"))

    console.open(driver, "/ui/models")
    shots(driver, "models")
    driver.find_element(By.LINK_TEXT, "cs-live").click()
    wait_for(driver, lambda d: d.current_url.endswith("/ui/models/cs-live"), "the model page")
    driver.find_element(By.CSS_SELECTOR, "a[href='/ui/models/cs-live/versions/1']").click()
    wait_for(driver, lambda d: d.current_url.endswith("/ui/models/cs-live/versions/1"), "the version page")
    shots(driver, "version")
    driver.find_element(By.CSS_SELECTOR, "a[href^='/ui/models/cs-live/versions/1/deploy']").click()
    Select(wait_for(driver, lambda d: d.find_element(By.ID, "environment"), "the environment choice")
           ).select_by_value("production")
    driver.find_element(By.ID, "show-plan").click()
    plan = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "section#plan"), "the plan")[0]
    assert "console-canary" in plan.text and "canary" in plan.text
    console.no_token_in(driver)
    shots(driver, "deploy-plan")

    driver.find_element(By.CSS_SELECTOR, "form[method=post] button[type=submit][data-action=deploy]").click()
    wait_for(driver, lambda d: "/ui/releases/r-" in d.current_url, "the release page")
    assert "queued" in _flash(driver)
    release_id = driver.current_url.rsplit("/", 1)[1]
    driver.execute_script("window.__sameDocument = true")  # gone if the page reloads
    seen = [_phase(driver)]

    def followed() -> bool:
        phase = _phase(driver)
        if phase != seen[-1]:
            seen.append(phase)
        return phase in TERMINAL

    wait_for(driver, lambda d: followed(), "the release to finish on the open page", timeout_s=240)
    assert seen[-1] == "succeeded", (seen, svc.job_log(release_id))
    assert driver.execute_script("return window.__sameDocument") is True, "the page reloaded"
    assert len(seen) >= 3, f"the page showed too few phases while open: {seen}"  # it followed, not jumped
    stages = {li.get_attribute("data-stage"): li.get_attribute("data-state")
              for li in driver.find_elements(By.CSS_SELECTOR, "ol#stages > li[data-stage]")}
    assert stages.get("promote") == "succeeded" and stages.get("smoke") == "succeeded", stages
    queued = driver.find_elements(By.CSS_SELECTOR, "ul#events > li.event[data-kind='release.queued']")
    assert queued and "dana" in queued[0].text, [e.text for e in queued]  # who deployed it
    assert svc.release_detail(release_id)["phase"] == "succeeded"
    assert svc.endpoint("cs-live")["traffic"] == {"1": 100}
    console.open(driver, "/ui/endpoints")
    assert "cs-live" in driver.find_element(By.TAG_NAME, "main").text


def test_stop_a_running_canary_from_the_jobs_page(console: Console, driver: Any, tmp_path: Path,
                                                  shots: Callable[[Any, str], Path]) -> None:
    svc = console.svc
    assert svc.endpoint("cs-live")["traffic"] == {"1": 100}, "the deploy test puts v1 in production first"
    svc.register("cs-live", tmp_path / "v2", iris_model(tmp_path / "v2", c=0.05))
    r = svc.api("POST", "/releases", json={"model": "cs-live", "version": 2, "environment": "production"})
    assert r.status_code in (200, 201, 202), r.text
    release_id = r.json()["id"]
    wait_until(lambda: svc.endpoint("cs-live")["traffic"] == {"1": 50, "2": 50}, 180)  # holding at 50 %
    promote = next(j for j in svc.release_detail(release_id)["jobs"] if j["type"] == "promote")
    assert promote["state"] == "running"

    sign_in(driver, svc, console.user("dana", "deployer"), then=f"/ui/releases/{release_id}")
    assert _phase(driver) == "promoting"
    shots(driver, "release-live")
    console.open(driver, "/ui/endpoints")  # the split as a bar: v1 and v2 at 50 % each
    shots(driver, "endpoints")
    console.open(driver, "/ui/endpoints/cs-live/production")  # its deployments, health, keys (masked)
    assert console.tokens["dana"] not in driver.page_source
    shots(driver, "endpoint")
    console.open(driver, "/ui/jobs?state=running")
    row_link = driver.find_element(By.CSS_SELECTOR, f"a[href='/ui/jobs/{promote['id']}']")
    shots(driver, "jobs")
    row_link.click()
    wait_for(driver, lambda d: d.current_url.endswith(f"/ui/jobs/{promote['id']}"), "the job page")
    log = driver.find_element(By.CSS_SELECTOR, "pre#log")
    wait_for(driver, lambda d: "50" in log.text, "the canary's log")
    shots(driver, "job-log")
    job_tab = driver.current_window_handle
    driver.switch_to.new_window("tab")  # the release page stays open, following, while the job page stops it
    console.open(driver, f"/ui/releases/{release_id}")
    driver.execute_script("window.__sameDocument = true")
    release_tab = driver.current_window_handle
    driver.switch_to.window(job_tab)
    driver.find_element(By.CSS_SELECTOR, "form[method=post] button[type=submit][data-action=stop]").click()
    assert "stop" in _flash(driver).lower()
    done = wait_until(lambda: (rel := svc.release_detail(release_id))["phase"] in TERMINAL and rel, 120)
    assert done["phase"] == "cancelled", svc.job_log(release_id)
    assert svc.endpoint("cs-live")["traffic"] == {"1": 100}  # the rollback put v1 back
    wait_for(driver, lambda d: d.find_element(By.ID, "job-state").get_attribute("data-state") == "cancelled",
             "the job page to show the stop")

    driver.switch_to.window(release_tab)
    wait_for(driver, lambda d: _phase(d) == "cancelled", "the open release page to show the stop")
    log = driver.find_element(By.CSS_SELECTOR, f"pre.log[data-job='{promote['id']}']")
    wait_for(driver, lambda d: "stopped by a person" in log.text, "the canary's last log line on the open page")
    assert driver.execute_script("return window.__sameDocument") is True, "the release page reloaded"
    driver.close()
    driver.switch_to.window(job_tab)
    assert "dana" in " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, "ul#events > li.event"))


def test_an_approver_answers_the_gate_in_the_console(console: Console, driver: Any, tmp_path: Path) -> None:
    svc = console.svc
    svc.register("cg-gate", tmp_path / "v1", iris_model(tmp_path / "v1"))
    rel = svc.client.wait_release(_release_of(svc, "cg-gate", 1)["id"], timeout_s=240)
    assert rel["phase"] == "awaiting_approval", svc.job_log(rel["id"])

    sign_in(driver, svc, console.user("ann", "approver"), then=f"/ui/releases/{rel['id']}")
    assert set(console.actions(driver)) == {"approve", "reject"}  # an approver answers gates, deploys nothing
    driver.find_element(By.CSS_SELECTOR, "textarea#approve-comment[name=comment]").send_keys("metrics look right")
    driver.find_element(By.CSS_SELECTOR, "form[method=post] button[type=submit][data-action=approve]").click()
    assert "approved" in _flash(driver).lower()
    approved = wait_for(driver, lambda d: d.find_elements(
        By.CSS_SELECTOR, "ul#events > li.event[data-kind='release.approved']"), "the approval in the events")[0]
    assert "ann" in approved.text and "metrics look right" in approved.text, approved.text
    wait_for(driver, lambda d: _phase(d) == "succeeded", "the release to reach production", timeout_s=120)
    events = [e for e in svc.release_detail(rel["id"])["events"] if e["kind"] == "release.approved"]
    assert [e["actor"] for e in events] == ["ann"], events


def test_a_viewer_sees_no_actions_and_the_api_refuses_their_writes(console: Console, driver: Any) -> None:
    svc = console.svc
    viewer = console.user("vic", "viewer")
    rel = _release_of(svc, "cs-live", 1)
    job = svc.release_detail(rel["id"])["jobs"][0]
    sign_in(driver, svc, viewer)
    assert driver.find_element(By.ID, "principal").get_attribute("data-role") == "viewer"
    for path in ("/ui/models", "/ui/models/cs-live", "/ui/models/cs-live/versions/1",
                 "/ui/models/cs-live/versions/1/deploy?environment=production", f"/ui/releases/{rel['id']}",
                 "/ui/releases", "/ui/endpoints", "/ui/endpoints/cs-live/production", "/ui/jobs",
                 f"/ui/jobs/{job['id']}", "/ui/inbox", "/ui/policies"):
        console.open(driver, path)
        assert driver.find_elements(By.CSS_SELECTOR, "main h1"), path
        assert console.actions(driver) == [], (path, console.actions(driver))

    # the forms are not there, and posting one anyway (with the session's CSRF token) is refused
    csrf = driver.find_element(By.CSS_SELECTOR, "input[name=csrf_token]").get_attribute("value")
    cookies = {c["name"]: c["value"] for c in driver.get_cookies()}
    r = requests.post(f"{svc.url}/ui/releases/{rel['id']}/rollback", data={"csrf_token": csrf}, cookies=cookies,
                      allow_redirects=False, timeout=10)
    assert r.status_code == 403, r.text
    bearer = {"Authorization": f"Bearer {viewer}"}
    assert svc.api("GET", "/models", headers=bearer).status_code == 200
    for method, path, body in (("POST", "/releases", {"model": "cs-live", "version": 1, "environment": "production"}),
                               ("POST", f"/jobs/{job['id']}/stop", {}),
                               ("POST", f"/releases/{rel['id']}/approve", {}),
                               ("POST", "/endpoints/cs-live/production/rollback", {}),
                               ("POST", "/endpoints/cs-live/production/keys", {"regenerate": "primary"})):
        r = svc.api(method, path, json=body, headers=bearer)
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert viewer not in r.text
    r = svc.api("PUT", "/policies", data=POLICIES[0], headers={**bearer, "Content-Type": "application/yaml"})
    assert r.status_code == 403, r.text
    assert svc.endpoint("cs-live")["traffic"] == {"1": 100}


def test_a_dead_letter_is_retried_from_the_inbox_page(console: Console, driver: Any, tmp_path: Path,
                                                      shots: Callable[[Any, str], Path]) -> None:
    svc = console.svc
    uri = "s3://models/console-late/1/"  # moto's objects are one store for the whole test process
    doc = {"model": "cs-late", "version": "1", "artifact_uri": uri, "release": False}
    assert _post(svc, doc, delivery="late-1").status_code == 202
    dead = wait_until(lambda: svc.api("GET", "/inbox", params={"state": "dead"}).json()["deliveries"], 60)[0]
    assert "no objects" in dead["last_error"]

    sign_in(driver, svc, console.user("dana", "deployer"), then="/ui/inbox")
    row = driver.find_element(By.CSS_SELECTOR, f"tr[data-delivery='{dead['id']}']")
    assert row.get_attribute("data-state") == "dead" and "no objects" in row.text
    shots(driver, "inbox")
    _echo_model(tmp_path / "late", 1)
    _upload(console.s3, tmp_path / "late", "console-late/1")  # what was missing is there now
    row.find_element(By.CSS_SELECTOR, "form[method=post] button[type=submit][data-action=retry]").click()
    assert "sent back for processing" in _flash(driver)

    def done(d: Any) -> bool:
        d.refresh()
        row = d.find_element(By.CSS_SELECTOR, f"tr[data-delivery='{dead['id']}']")
        return row.get_attribute("data-state") == "done"

    wait_for(driver, done, "the delivery to be done after the retry", timeout_s=60)
    assert svc.api("GET", "/models/cs-late/versions/1").status_code == 200
    assert console.actions(driver) == []  # nothing dead is left to retry


def test_csrf_xss_and_no_token_in_pages_urls_or_logs(console: Console, driver: Any, tmp_path: Path) -> None:
    svc = console.svc
    meta = {**iris_model(tmp_path / "x"), "description": XSS, "tags": {"note": XSS[:120]}}
    svc.register("cs-xss", tmp_path / "x", meta)
    sign_in(driver, svc, TOKEN)
    for path in ("/ui/models?q=cs-xss", "/ui/models/cs-xss", "/ui/models/cs-xss/versions/1"):
        console.open(driver, path)
        if path != "/ui/models?q=cs-xss":  # the list shows models' own descriptions (empty), not versions'
            assert "window.__xss = 1" in driver.find_element(By.TAG_NAME, "main").text, path  # shown as text
        assert driver.execute_script("return window.__xss") is None, path  # and never run
        assert driver.find_elements(By.CSS_SELECTOR, "main script, main img[src=x]") == [], path

    # CSRF: the admin's own session cannot post without the form's token, or from another site
    rel = _release_of(svc, "cs-live", 1)
    console.open(driver, f"/ui/releases/{rel['id']}")
    csrf = driver.find_element(By.CSS_SELECTOR, "input[name=csrf_token]").get_attribute("value")
    cookies = {c["name"]: c["value"] for c in driver.get_cookies()}
    url = f"{svc.url}/ui/releases/{rel['id']}/stop"  # a finished release: the stop is refused on the page
    for data, headers in (({}, {}), ({"csrf_token": "x" * len(csrf)}, {}),
                          ({"csrf_token": csrf}, {"Origin": "http://evil.example"})):
        r = requests.post(url, data=data, headers=headers, cookies=cookies, allow_redirects=False, timeout=10)
        assert r.status_code == 403, (data, headers, r.status_code)
    r = requests.post(url, data={"csrf_token": csrf}, cookies=cookies, allow_redirects=False, timeout=10)
    assert r.status_code == 303  # the same form with its token gets through (to the domain's answer)
    assert svc.release_detail(rel["id"])["phase"] == "succeeded"

    for log in svc.logs:
        text = log.read_text(errors="replace")
        for who, token in console.tokens.items():
            assert token not in text, f"{who}'s token in {log.name}"


def test_keyboard_alone_and_200_percent_zoom(console: Console, driver: Any) -> None:
    """Last: the pages hold what the tests before made."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    driver.delete_all_cookies()
    console.open(driver, "/ui/login?next=/ui/models")
    driver.switch_to.active_element.send_keys(TOKEN, Keys.ENTER)  # the token field has the focus
    # the login page's own address ends with ?next=/ui/models: wait for the models page's path
    wait_for(driver, lambda d: urllib.parse.urlsplit(d.current_url).path == "/ui/models" and d.execute_script(
        "return document.readyState") == "complete", "the models page, signed in by keyboard")
    ActionChains(driver).send_keys(Keys.TAB).perform()  # to the page, not an element a navigation could replace
    assert driver.switch_to.active_element.text == "Skip to content"
    for _ in range(12):  # Tab along the navigation to Jobs, then Enter
        driver.switch_to.active_element.send_keys(Keys.TAB)
        if driver.switch_to.active_element.text == "Jobs":
            break
    driver.switch_to.active_element.send_keys(Keys.ENTER)
    wait_for(driver, lambda d: d.current_url.endswith("/ui/jobs"), "the jobs page, reached by keyboard")

    # 200 % zoom of a 1280 px window: a 640 px wide viewport at twice the pixels; nothing spills sideways
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 640, "height": 900, "deviceScaleFactor": 2, "mobile": False})
    try:
        rel = _release_of(console.svc, "cs-live", 2)  # the stopped canary: stages, steps, charts, logs
        job = console.svc.release_detail(rel["id"])["jobs"][-1]
        for path in ("/ui/models", "/ui/models/cs-live", "/ui/models/cs-live/versions/1", "/ui/releases",
                     f"/ui/releases/{rel['id']}", "/ui/endpoints", "/ui/endpoints/cs-live/production", "/ui/jobs",
                     f"/ui/jobs/{job['id']}", "/ui/inbox", "/ui/policies"):
            console.open(driver, path)
            wide = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
            assert wide <= 0, f"{path} is {wide}px wider than the window at 200 %"
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
