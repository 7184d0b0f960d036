"""GET / and /static/*: the page's headers (CSP), caching (ETag, 304, versioned asset links), its size
budget and the rules its source keeps (nothing inline, no CDN, no HTML from data). The page's
behaviour is tested in a real browser in tests/browser/."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from app.routes.ui import ASSETS, CSP, PAGE, STATIC_DIR

ASSET_BUDGET_BYTES = 100 * 1024


def _csp(header: str) -> dict[str, list[str]]:
    return {d.split()[0]: d.split()[1:] for d in (p.strip() for p in header.split(";")) if d}


def test_page_has_a_strict_content_security_policy(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = _csp(r.headers["content-security-policy"])
    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == ["'self'"] and policy["style-src"] == ["'self'"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert not [d for d, values in policy.items() if any("unsafe" in v or v == "*" for v in values)], policy
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-cache"  # always revalidated, so a release reaches browsers


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_page_has_nothing_inline_and_links_versioned_assets(client):
    html = client.get("/").text
    parser = _Tags()
    parser.feed(html)
    scripts = [a for t, a in parser.tags if t == "script"]
    assert scripts and all(a.get("src") for a in scripts), "an inline script would need 'unsafe-inline'"
    assert "<style" not in html
    assert not [(t, a) for t, a in parser.tags if "style" in a or any(k.startswith("on") for k in a)]
    links = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
    assert sorted(link.split("?")[0] for link in links) == sorted(f"/static/{n}" for n in ASSETS)
    for link in links:
        name, version = link.removeprefix("/static/").split("?v=")
        r = client.get(link)
        assert r.status_code == 200 and r.headers["etag"] == f'"{version}"'
        assert r.headers["content-type"].split(";")[0] == ASSETS[name].split(";")[0]
        assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
        # an unversioned (or stale) link is revalidated every time instead
        assert client.get(f"/static/{name}").headers["cache-control"] == "no-cache"
        assert client.get(f"/static/{name}?v=old").headers["cache-control"] == "no-cache"


def test_etags_answer_304(client):
    for path in ("/", "/static/app.js", "/static/app.css", "/static/icon.svg"):
        first = client.get(path)
        etag = first.headers["etag"]
        assert re.fullmatch(r'"[0-9a-f]{20}"', etag)
        again = client.get(path, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
        assert client.get(path, headers={"If-None-Match": f'W/{etag}, "other"'}).status_code == 304
        changed = client.get(path, headers={"If-None-Match": '"stale"'})
        assert changed.status_code == 200 and changed.content == first.content
    assert "content-security-policy" in client.get("/", headers={"If-None-Match": "*"}).headers


def test_only_the_page_files_are_served(client):
    for path in ("/static/index.html", "/static/../main.py", "/static/%2e%2e%2fmain.py", "/static/nope.js",
                 "/static/"):
        r = client.get(path)
        assert r.status_code == 404, (path, r.status_code)
        assert r.json()["error"]["code"] == "not_found"


def test_page_is_not_part_of_the_api_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not [p for p in paths if p.startswith("/static")]


def test_page_and_assets_fit_the_size_budget():
    names = [PAGE, *ASSETS]
    sizes = {name: (STATIC_DIR / name).stat().st_size for name in names}
    assert sum(sizes.values()) < ASSET_BUDGET_BYTES, sizes
    assert sorted(p.name for p in STATIC_DIR.iterdir()) == sorted(names)  # nothing unserved ships


def test_sources_insert_data_as_text_and_load_nothing_from_elsewhere():
    js = (STATIC_DIR / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, f"app.js uses {sink}: captions and metadata must go in as text"
    for name in [PAGE, *ASSETS]:
        text = (STATIC_DIR / name).read_text()
        external = [u for u in re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", text)
                    if "www.w3.org/2000/svg" not in u]
        assert external == [], (name, external)


def test_csp_allows_what_the_page_needs():
    # the page shows a picked image through a blob: URL and fetches the API from its own origin
    policy = _csp(CSP)
    assert "blob:" in policy["img-src"] and "'self'" in policy["img-src"]
    assert policy["connect-src"] == ["'self'"]
