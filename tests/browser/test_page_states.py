"""The page when the service cannot answer: not ready yet (with the reason, then recovering on its
own), failed to load (the reason stays on screen), overloaded (429)."""

from __future__ import annotations

import threading

import httpx

from clipsearch.manifest import ArtifactError


def _app(app_fakes, tmp_path, page_data, loader=None, encoder=None, **overrides):
    from app.main import create_app

    settings = app_fakes.settings_for(tmp_path, **overrides)
    if loader is not None:
        return create_app(settings, loader=loader)
    return create_app(settings, app_fakes.fake_resources(page_data.dataset, encoder))


def test_not_ready_shows_the_reason_then_the_results_once_loaded(page, serve, app_fakes, tmp_path, page_data):
    release = threading.Event()

    def slow_loader(_settings):
        assert release.wait(30), "the test never let the load finish"
        return app_fakes.fake_resources(page_data.dataset)

    server = serve(_app(app_fakes, tmp_path, page_data, loader=slow_loader))
    reason = httpx.get(server.url + "/readyz").json()["reason"]
    page.url = server.url
    page.open("/?q=red&k=3", state="not-ready")
    notice = page.one("#notice").text
    assert reason and reason in notice, (reason, notice)
    assert page.card_ids() == []
    release.set()  # the page polls /readyz and runs the search from its URL when ready
    page.wait_state("done")
    assert len(page.card_ids()) == 3
    assert all(w > 0 for w in page.wait_images_loaded("#results .card img"))


def test_failed_load_keeps_its_reason_on_screen(page, serve, app_fakes, tmp_path, page_data):
    def broken(_settings):
        raise ArtifactError("collection 'photos' has no catalog.sqlite: run `python -m offline ingest` first")

    server = serve(_app(app_fakes, tmp_path, page_data, loader=broken))
    page.url = server.url
    page.open("/?q=red", state="not-ready")
    reason = httpx.get(server.url + "/readyz").json()["reason"]
    assert "has no catalog.sqlite" in reason
    assert reason in page.one("#notice").text
    assert page.one("#search-form").is_displayed()  # never a blank page


def test_overload_says_the_server_is_busy(page, serve, app_fakes, tmp_path, page_data):
    encoder = app_fakes.GatedEncoder()
    server = serve(_app(app_fakes, tmp_path, page_data, encoder=encoder, max_in_flight=1, cache_size=0,
                        retry_after_s=2))
    held = threading.Thread(target=lambda: httpx.post(server.url + "/search/text", json={"query": "held"}, timeout=30))
    held.start()
    try:
        assert encoder.entered.wait(10)  # the one search slot is now taken
        page.url = server.url
        page.open("/?q=red", state="error")
        error = page.one("#error").text
        assert "busy" in error and "Try again in 2 s" in error, error
        assert "searches in flight" in error  # the API's own message
    finally:
        encoder.release.set()
        held.join(30)
