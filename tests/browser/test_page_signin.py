"""The page of a service with API keys, in headless Chromium: it asks for a key, signs in (a wrong key
first), searches with thumbnails loaded through the session cookie, and signs out again."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("selenium", reason="selenium is in the [test] extras")

from selenium.webdriver.common.keys import Keys  # noqa: E402

from clipsearch.keys import ApiKey, hash_key, write_keys_file  # noqa: E402

KEY = "page-reader-key-0123456789abcdef"


@pytest.fixture
def keyed_server(serve, app_fakes, page_data, tmp_path):
    from app.main import create_app

    keys = tmp_path / "keys.txt"
    write_keys_file(keys, [ApiKey("page-reader", "read", hash_key(KEY))])
    resources = app_fakes.fake_resources(page_data.dataset)
    return serve(create_app(app_fakes.settings_for(tmp_path, api_keys_file=keys), resources))


def test_sign_in_search_and_sign_out(driver, page, keyed_server):
    driver.get_log("browser")
    page = type(page)(driver, keyed_server.url)  # conftest's Page helper, on the keyed server
    page.open("/", state="signin")
    assert page.one("#signin").is_displayed() and not page.one("#signout").is_displayed()

    page.one("#signin-key").send_keys("not-the-key", Keys.ENTER)
    page.wait.until(lambda _: page.one("#signin-error").is_displayed(), "no error for a wrong key")
    assert "not valid" in page.one("#signin-error").text and page.state() == "signin"

    box = page.one("#signin-key")
    box.clear()
    box.send_keys(KEY, Keys.ENTER)
    page.wait_state("idle")
    assert not page.one("#signin").is_displayed() and page.one("#signout").is_displayed()
    assert page.d.execute_script("return document.cookie") == ""  # HttpOnly: no script sees the session

    q = page.one("#q")
    assert page.after_search(lambda: q.send_keys("red square", Keys.ENTER)) == "done"
    with httpx.Client(base_url=keyed_server.url, headers={"X-API-Key": KEY}) as api:
        expected = [h["image_id"] for h in api.post("/search/text", json={"query": "red square", "k": 24})
                    .json()["results"]]
    assert page.card_ids() == expected
    widths = page.wait_images_loaded("#results .card img")  # <img> requests carry the cookie
    assert widths and all(w > 0 for w in widths), widths
    assert page.csp_violations() == []

    page.one("#signout").click()
    page.wait_state("signin")
    assert page.one("#signin").is_displayed() and page.card_ids() == []
    status = page.d.execute_async_script(
        "const done = arguments[0]; fetch('/collections').then(r => done(r.status))")
    assert status == 401
    page.d.refresh()
    page.wait_state("signin")  # signed out for good, not only on this page


def test_page_unchanged_on_loopback_without_keys(page):
    """The default server of these tests has no key: no sign-in, no sign-out, searches as before."""
    page.open("/")
    assert not page.one("#signin").is_displayed() and not page.one("#signout").is_displayed()
