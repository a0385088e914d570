"""The web console in a real browser: Playwright driving Debian's chromium against a real
`twistd tcm` (all-in-one) with three real agents.

Sign in with the API token, see the agents, run `command.run` on them from the endpoints
page's selection and watch output arrive and the counts reach 3 succeeded without a reload;
a viewer's run is refused with the server's reason; a hostile hostname shows as text (no
dialog); the browser logs no error.

Skipped when chromium or the playwright package is missing (`.ci/run` installs both).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile

import pytest
import requests

from tcm.tls import pki
from tests.harness import Server, launch_chromium, start_agents

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium")
HOSTILE = "<img src=x onerror=alert(1)>"
TIMEOUT = 30_000  # ms: bounded waits for what the page shows


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A `twistd tcm` with 3 real agents and one enrolled agent whose hostname is hostile."""
    base = str(tmp_path_factory.mktemp("console"))
    server = Server(base, plugin="tcm")
    server.start()
    agents = start_agents(base, server, 3)
    try:
        token = server.token(uses=1)
        key = pki.generate_key()
        r = requests.post(
            f"{server.url}/agent/v1/enroll",
            json={"token": token, "csr": pki.make_csr(key).decode(), "hostname": HOSTILE},
            verify=server.ca,
            timeout=30,
        )
        assert r.status_code == 201, r.text
        with open(os.path.join(server.state_dir, "admin.token")) as f:
            admin = f.read().strip()
        viewer = server.cli("apitoken", "create", "val", "--role", "viewer").strip()
        yield {
            "server": server,
            "agents": [a.agent_id for a in agents],
            "hostile": r.json()["agent_id"],
            "admin": admin,
            "viewer": viewer,
        }
    finally:
        for a in agents:
            a.stop()
        server.stop()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = launch_chromium(p)
        try:
            yield b
        finally:
            b.close()


class Watched:
    """A page whose console errors, uncaught exceptions and dialogs are recorded."""

    def __init__(self, browser):
        self.context = browser.new_context(ignore_https_errors=True)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT)
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("dialog", self._dialog)

    def _dialog(self, dialog):
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def sign_in(self, url: str, token: str, path: str = "") -> None:
        self.page.goto(f"{url}/console/{path}")
        self.page.get_by_label("API token").fill(token)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.locator("#whoami").wait_for()

    def close(self):
        self.context.close()


def test_console_headers_and_deep_links(fleet):
    """/console/<anything> is the app, with a CSP without inline script; assets are typed."""
    server = fleet["server"]
    r = requests.get(f"{server.url}/console/jobs/abc", verify=server.ca, timeout=10)
    assert r.status_code == 200 and '<script type="module"' in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    js = requests.get(f"{server.url}/console/js/app.js", verify=server.ca, timeout=10)
    assert js.headers["content-type"].startswith("text/javascript")
    missing = requests.get(f"{server.url}/console/js/nope.js", verify=server.ca, timeout=10)
    assert missing.status_code == 404
    # the event stream wants the token like every API route
    refused = requests.get(f"{server.url}/api/v1/events", verify=server.ca, timeout=10)
    assert refused.status_code == 401


def test_sign_in_see_agents_run_and_watch_it_finish_live(fleet, browser):
    server, ids = fleet["server"], fleet["agents"]
    w = Watched(browser)
    page = w.page
    try:
        w.sign_in(server.url, fleet["admin"])
        page.evaluate("window.__no_reload = 1")  # gone if the page reloads
        page.get_by_role("link", name="Endpoints").click()
        for agent_id in ids:
            page.locator(f'.vt-row[data-key="{agent_id}"]').wait_for()
        # the hostile hostname is text: no element made of it, no dialog fired
        hostile = page.locator(f'.vt-row[data-key="{fleet["hostile"]}"] [data-col="name"]')
        assert hostile.text_content() == HOSTILE
        assert page.locator(".vtable img").count() == 0
        for agent_id in ids:
            page.locator(f'.vt-row[data-key="{agent_id}"] input[type="checkbox"]').check()
        page.get_by_role("button", name="Run action on selection").click()
        page.locator("#action").select_option("command.run")
        page.locator("#arg-argv").fill("sh\n-c\necho hello-console; sleep 1; echo done-console")
        page.get_by_role("button", name="Run", exact=True).click()
        page.wait_for_url("**/console/jobs/*")
        job_id = page.url.rsplit("/", 1)[1]
        # live: counts reach 3 succeeded, rows say so, output arrives (no reload)
        succeeded = page.locator('[data-count="succeeded"] .n')
        page.wait_for_function(
            "() => document.querySelector('[data-count=\"succeeded\"] .n')?.textContent === '3'",
            timeout=TIMEOUT,
        )
        assert succeeded.text_content() == "3"
        for agent_id in ids:
            row = page.locator(f'.vt-row[data-key="{agent_id}"]')
            assert row.locator('[data-col="agent"]').text_content() == agent_id
            assert row.locator('[data-col="state"]').text_content() == "succeeded"
        page.wait_for_function(
            "() => document.querySelector('#job-output').textContent.includes('done-console')"
        )
        assert page.evaluate("window.__no_reload") == 1
        # the job's deep link works after a reload too
        page.goto(f"{server.url}/console/jobs/{job_id}")
        page.locator(f'.vt-row[data-key="{ids[0]}"] [data-col="state"]').wait_for()
        assert page.locator('[data-count="succeeded"] .n').text_content() == "3"
        assert w.dialogs == []
        assert w.errors == []
    finally:
        w.close()


def test_a_viewer_sees_but_is_refused_with_the_reason(fleet, browser):
    server = fleet["server"]
    w = Watched(browser)
    page = w.page
    try:
        w.sign_in(server.url, fleet["viewer"], path="run")  # a deep link, then sign-in
        page.locator("#arg-argv").fill("true")
        page.get_by_role("button", name="Run", exact=True).click()
        refusal = page.locator("#run-result .msg-error")
        refusal.wait_for()
        text = refusal.text_content()
        assert "403" in text and "'viewer'" in text and "may not create jobs" in text
        assert "/console/run" in page.url
        # the refused request is the only error the browser logged
        assert all("status of 403" in e for e in w.errors), w.errors
        assert w.dialogs == []
    finally:
        w.close()


def test_a_bad_filter_shows_the_servers_error_at_its_position(fleet, browser):
    server = fleet["server"]
    w = Watched(browser)
    page = w.page
    try:
        w.sign_in(server.url, fleet["admin"], path="endpoints")
        query = "online and nosuchfield = 1"
        page.locator("#filter").fill(query)
        page.get_by_role("button", name="Filter", exact=True).click()
        error = page.locator(".filter-error .msg-error")
        error.wait_for()
        message = error.text_content()
        position = int(re.search(r"at position (\d+)", message).group(1))
        assert page.locator(".filter-error mark").text_content() == query[position]
        page.locator("#filter").fill("online")
        page.get_by_role("button", name="Filter", exact=True).click()
        page.wait_for_function(
            "() => document.querySelector('#endpoint-counts').textContent.startsWith('3 shown')"
        )
        assert all("status of 400" in e for e in w.errors), w.errors
    finally:
        w.close()


# each page: its link, its heading, what it shows once its data arrived
PAGES = [
    ("Overview", "Overview", '[data-count="agents"]'),
    ("Endpoints", "Endpoints", ".vt-body .vt-row"),
    ("Run", "Run an action", "#arg-argv"),
    ("Jobs", "Jobs", 'table[aria-label="jobs"], main .empty'),
    ("Inventory", "Inventory freshness", 'table[aria-label="freshness"], main .empty'),
    ("Policies", "Policies", 'table[aria-label="policies"], main .empty'),
    ("Targets", "Targets", 'table[aria-label="targets"], main .empty'),
    ("Profiles", "Connection profiles", 'table[aria-label="profiles"], main .empty'),
    ("Task servers & gateways", "Task servers and gateways", 'table[aria-label="task servers"]'),
    ("Settings", "Settings", 'table[aria-label="settings"]'),
    ("Audit", "Audit log", 'table[aria-label="audit"], main .empty'),
]


@pytest.mark.parametrize("role", ["admin", "viewer"])
def test_every_page_renders_without_a_browser_error(fleet, browser, role):
    server = fleet["server"]
    w = Watched(browser)
    page = w.page
    try:
        w.sign_in(server.url, fleet[role])
        for link, heading, loaded in PAGES:
            page.get_by_role("link", name=link, exact=True).click()
            page.get_by_role("heading", name=heading, exact=True).wait_for()
            page.locator(loaded).first.wait_for()
            assert page.locator(".msg-error").count() == 0, (
                link,
                page.locator(".msg-error").all_text_contents(),
            )
        assert w.errors == [] and w.dialogs == []
    finally:
        w.close()


def test_install_package_downloads_the_archive(fleet, browser, tmp_path):
    """Profiles → install package: the server builds the package (POST, the token in the
    header), the page saves the archive: the wheels, the CA, the profile, install.sh and an
    enrollment token scoped to the profile. A viewer's click shows the server's refusal."""
    server = fleet["server"]
    server.cli("profiles", "create", "browser-pkg", "--set", "keepalive=45")
    w = Watched(browser)
    page = w.page
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    try:
        w.sign_in(server.url, fleet["admin"], path="profiles")
        row = page.locator('table[aria-label="profiles"] tr', has_text="browser-pkg")
        button = row.get_by_role("button", name="install package")
        # the first package waits for the server's wheel build (its cache is empty)
        with page.expect_download(timeout=600_000) as info:
            button.click()
        download = info.value
        assert download.suggested_filename == "tcm-agent-browser-pkg.tar.gz"
        saved = tmp_path / download.suggested_filename
        download.save_as(saved)
        with tarfile.open(saved) as tar:
            names = tar.getnames()
            env_file = tar.extractfile("tcm-agent-browser-pkg/agent.env")
            assert env_file is not None
            env = env_file.read().decode()
            profile_file = tar.extractfile("tcm-agent-browser-pkg/profile.json")
            assert profile_file is not None
            profile = json.loads(profile_file.read())
        top = "tcm-agent-browser-pkg/"
        for name in ("install.sh", "ca.pem", "agent-requirements.txt", "tcm-agent.service"):
            assert top + name in names
        wheels = [n for n in names if n.startswith(top + "wheels/") and n.endswith(".whl")]
        assert any("/tcm-" in n for n in wheels) and any("/twisted-" in n for n in wheels)
        assert profile["name"] == "browser-pkg" and profile["settings"] == {"keepalive": 45}
        assert env.startswith(f"TCM_SERVER='{server.url}'\n")  # the address the console used
        token_id = env.split("TCM_TOKEN='", 1)[1].split(".", 1)[0]
        token = next(t for t in server.cli_json("token", "list") if t["id"] == token_id)
        assert token["profile"] == "browser-pkg" and token["uses_left"] == 100
        done = page.locator("#profiles-result .msg-ok")
        done.wait_for()
        assert "tcm-agent-browser-pkg.tar.gz downloaded" in (done.text_content() or "")
        assert any(u.endswith("/api/v1/profiles/browser-pkg/package") for u in urls)
        assert not [u for u in urls if fleet["admin"] in u]  # the token is never in a URL
        assert w.errors == [] and w.dialogs == []
    finally:
        w.close()

    w = Watched(browser)
    page = w.page
    try:
        w.sign_in(server.url, fleet["viewer"], path="profiles")
        row = page.locator('table[aria-label="profiles"] tr', has_text="browser-pkg")
        row.get_by_role("button", name="install package").click()
        refusal = page.locator("#profiles-result .msg-error")
        refusal.wait_for()
        text = refusal.text_content() or ""
        assert "Refused (403)" in text and "'viewer'" in text
        assert "may not build install packages" in text
        assert all("status of 403" in e for e in w.errors), w.errors
    finally:
        w.close()
