"""/docs and /redoc work offline: a real server's OpenAPI pages load Swagger UI and ReDoc from the server itself,
under a CSP that allows only that, and a real Chromium that may reach nothing but the server draws the API."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from tests.browser import browser_fixture, open_page  # noqa: F401  (the `browser` fixture)
from tests.helpers import running_server

pytestmark = pytest.mark.integration


class _Refs(HTMLParser):
    """Every URL the page makes the browser fetch: script src, link href (css, icon), img src."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        for name in ("src", "href"):
            if found.get(name):
                self.refs.append((tag, found[name]))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("docs-server"), processor="filter") as srv:
        yield srv


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_pages_reference_only_our_own_assets_and_they_are_served(server, path):
    page = httpx.get(f"{server.http}{path}", timeout=10)
    assert page.status_code == 200
    parser = _Refs()
    parser.feed(page.text)
    scripts = [url for tag, url in parser.refs if tag == "script"]
    assert scripts, parser.refs
    origin = urlsplit(server.http)
    for tag, ref in parser.refs:
        url = urlsplit(urljoin(f"{server.http}{path}", ref))
        assert (url.scheme, url.netloc) == (origin.scheme, origin.netloc), f"<{tag}> fetches {ref} from elsewhere"
        asset = httpx.get(url.geturl(), timeout=10)
        assert asset.status_code == 200, f"{ref}: {asset.status_code}"
        assert len(asset.content) > 100, ref
    assert "cdn" not in page.text.lower() and "googleapis" not in page.text
    js = httpx.get(urljoin(server.http, scripts[0]), timeout=10)
    assert "javascript" in js.headers["content-type"]
    if path == "/docs":
        assert "SwaggerUIBundle" in js.text
        styles = [url for tag, url in parser.refs if tag == "link" and url.endswith(".css")]
        assert styles and "text/css" in httpx.get(urljoin(server.http, styles[0]), timeout=10).headers["content-type"]


def test_docs_has_its_own_csp_without_inline_scripts_at_large(server):
    page = httpx.get(f"{server.http}/docs", timeout=10)
    csp = page.headers["content-security-policy"]
    script_src = re.search(r"script-src ([^;]*)", csp).group(1).split()
    assert "'self'" in script_src and "'unsafe-inline'" not in script_src and "*" not in script_src
    assert all(s == "'self'" or s.startswith("'sha256-") for s in script_src), csp
    assert "https:" not in csp and "http:" not in csp
    # the pages keep theirs: the studio's CSP allows no inline script at all
    studio = httpx.get(f"{server.http}/", timeout=10).headers["content-security-policy"]
    assert "script-src 'self';" in studio


@pytest.mark.parametrize(("path", "operation", "title"), [
    ("/docs", ".opblock-summary-path", ".info .title"),
    ("/redoc", "[data-section-id^='operation/']", "h1"),
])
def test_docs_pages_render_in_chromium_with_only_the_server_reachable(server, browser, path, operation, title):
    """Every request to another origin is refused, as offline: the page still draws the operations, and it
    logs no error (a CSP violation would be a console error)."""
    errors: list[str] = []
    elsewhere: list[str] = []
    context = browser.new_context()
    own = urlsplit(server.http).netloc

    def guard(route) -> None:
        if urlsplit(route.request.url).netloc == own:
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", guard)
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: msg.type == "error" and errors.append(f"console: {msg.text}"))
    try:
        page.goto(f"{server.http}{path}")
        page.wait_for_selector(operation, timeout=15_000)
        assert "/api/process" in page.locator("body").inner_text()
        assert "DreamStream" in page.locator(title).first.inner_text()
        page.screenshot(path=str(server.log_path.with_name(f"{path.strip('/')}.png")))
    finally:
        context.close()
    assert not elsewhere, elsewhere
    # ReDoc's "powered by" footer links its logo from redocly's CDN: the CSP refuses it, nothing else is missing
    assert not [e for e in errors if "cdn.redoc.ly/redoc/logo" not in e], errors


def test_docs_page_in_open_page_helper_loads(server, browser):
    """The same page through the suite's usual helper (the default context): no JS errors."""
    errors: list[str] = []
    with open_page(browser, f"{server.http}/docs", errors=errors) as page:
        page.wait_for_selector(".opblock", timeout=15_000)
    assert not errors, errors
