"""The search page against the real app (fake encoder, 12 tiny images) in headless Chromium: what it
shows is compared with the API's own answers for the same request, never with hard-coded rankings."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import pytest

pytest.importorskip("selenium", reason="selenium is in the [test] extras")

from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402


def _ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [hit["image_id"] for hit in response.json()["results"]]


def _search(page, text: str) -> None:
    box = page.one("#q")
    box.clear()
    assert page.after_search(lambda: box.send_keys(text, Keys.ENTER)) == "done"


def test_typed_query_shows_k_loaded_thumbnails_and_survives_a_reload(page, api):
    page.open("/?k=5")
    _search(page, "red square")
    expected = _ids(api.post("/search/text", json={"query": "red square", "k": 5}))
    assert page.card_ids() == expected
    widths = page.wait_images_loaded("#results .card img")
    assert len(widths) == 5 and all(w > 0 for w in widths), widths
    # the grid holds thumbnails, never the full images
    srcs = [img.get_attribute("src") for img in page.all("#results .card img")]
    assert all(urlparse(s).path.startswith("/thumbnails/") for s in srcs), srcs
    assert all(img.get_attribute("loading") == "lazy" for img in page.all("#results .card img"))
    # the score of each result, the count and the latency from Server-Timing
    scores = [float(s.text) for s in page.all("#results .card .score")]
    api_scores = [h["score"] for h in api.post("/search/text", json={"query": "red square", "k": 5}).json()["results"]]
    assert scores == [round(s, 3) for s in api_scores]
    notice = page.one("#notice").text
    assert notice.startswith("5 images") and " ms on the server" in notice, notice
    # the query lives in the URL: a reload (or a shared link) shows the same results
    assert parse_qs(urlparse(page.d.current_url).query)["q"] == ["red square"]
    page.d.refresh()
    page.wait_state("done")
    assert page.one("#q").get_attribute("value") == "red square"
    assert page.card_ids() == expected
    fetched = page.d.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).pathname)")
    assert not [p for p in fetched if p.startswith("/images/")], fetched
    assert page.csp_violations() == []


def test_load_more_appends_the_next_pages(page, api):
    page.open("/?q=blue&k=5", state="done")
    pages = [_ids(api.post("/search/text", json={"query": "blue", "k": 5, "offset": o})) for o in (0, 5, 10)]
    assert page.card_ids() == pages[0]
    more = page.one("#more")
    assert page.after_search(more.click) == "done"
    assert page.card_ids() == pages[0] + pages[1]
    assert page.after_search(more.click) == "done"
    assert page.card_ids() == pages[0] + pages[1] + pages[2]
    assert len(pages[2]) == 2 and not more.is_displayed()  # the last page was short: nothing more
    assert page.one("#notice").text.startswith("12 images")


def test_picked_image_file_shows_its_preview_and_similar_images(page, api, app_fakes, tmp_path):
    data = app_fakes.png_bytes(app_fakes._image("stripes", "red", "white"))
    path = tmp_path / "query.png"
    path.write_bytes(data)
    page.open("/?k=6")
    assert page.after_search(lambda: page.one("#file").send_keys(str(path))) == "done"
    expected = _ids(api.post("/search/image", files={"file": ("query.png", data, "image/png")}, data={"k": "6"}))
    assert page.card_ids() == expected
    assert page.one("#query-box").is_displayed()
    assert page.one("#query-img").get_attribute("src").startswith("blob:")
    assert page.wait_images_loaded("#query-img")[0] > 0
    assert all(w > 0 for w in page.wait_images_loaded("#results .card img"))
    # the switch to captions: the uploaded image's matching captions
    captions = api.post("/search/image", files={"file": ("query.png", data, "image/png")},
                        data={"k": "6", "target": "captions"}).json()["results"]
    assert page.after_search(page.one("#target-box input[value=captions]").click) == "done"
    rows = page.all("#caption-results .caption-row")
    assert [r.find_element(page.By.CSS_SELECTOR, ".caption-text").text for r in rows] == [c["caption"] for c in captions]
    assert not page.one("#results").is_displayed()
    page.one("#target-box input[value=images]").click()  # leave the shared browser as found
    page.wait_state("done")


DROP = """
const [bytes, name] = arguments;
const file = new File([Uint8Array.from(bytes)], name, {type: 'image/png'});
const dt = new DataTransfer();
dt.items.add(file);
for (const type of ['dragenter', 'dragover', 'drop']) {
  document.querySelector('main').dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
}
"""


def test_dropped_image_searches_by_image(page, api, app_fakes):
    data = app_fakes.png_bytes(app_fakes._image("checkerboard", "black", "yellow"))
    page.open("/?k=4")
    assert page.after_search(lambda: page.d.execute_script(DROP, list(data), "dropped.png")) == "done"
    expected = _ids(api.post("/search/image", files={"file": ("dropped.png", data, "image/png")}, data={"k": "4"}))
    assert page.card_ids() == expected
    assert page.one("#query-label").text == "Searching by dropped.png"
    assert not page.one("#drop-zone").is_displayed()


def test_more_like_this_searches_by_a_result(page, api):
    page.open("/?q=green&k=4", state="done")
    first = page.card_ids()[0]
    like = page.one(f'#results .card[data-image-id="{first}"] .like')
    assert page.after_search(like.click) == "done"
    expected = _ids(api.post("/search/similar", json={"image_id": first, "k": 4}))
    assert page.card_ids() == expected and first not in expected
    query = parse_qs(urlparse(page.d.current_url).query)
    assert query["like"] == [first] and "q" not in query
    assert page.one("#query-label").text == f"More like {first}"
    assert page.wait_images_loaded("#query-img")[0] > 0
    page.d.back()  # history: back to the text search
    page.wait.until(lambda _: page.card_ids() == _ids(api.post("/search/text", json={"query": "green", "k": 4})))


def test_bad_upload_shows_the_api_error_text(page, api, tmp_path):
    path = tmp_path / "notes.png"
    path.write_bytes(b"this is not an image at all")
    expected = api.post("/search/image", files={"file": ("notes.png", path.read_bytes(), "image/png")})
    assert expected.status_code == 422
    message = expected.json()["error"]["message"]
    page.open("/")
    assert page.after_search(lambda: page.one("#file").send_keys(str(path))) == "error"
    error = page.one("#error")
    assert error.is_displayed() and message in error.text, (error.text, message)
    assert page.card_ids() == []
    assert page.one("header").is_displayed()  # the page stays usable, never blank


def test_caption_markup_is_shown_as_text(page, page_data):
    MARKUP_IMAGE, MARKUP_CAPTION = page_data.markup_image, page_data.markup_caption  # noqa: N806
    page.open("/?q=red%20marker&k=3", state="done")
    assert page.card_ids()[0] == MARKUP_IMAGE, page.card_ids()
    card = page.one(f'#results .card[data-image-id="{MARKUP_IMAGE}"]')
    texts = [li.get_attribute("textContent") for li in card.find_elements(page.By.CSS_SELECTOR, ".card-captions li")]
    assert MARKUP_CAPTION in texts
    assert card.find_elements(page.By.CSS_SELECTOR, "b, script") == []
    assert page.d.title == "clipsearch"  # the caption's script never ran
    # and in the full view
    card.find_element(page.By.CSS_SELECTOR, ".thumb").click()
    page.wait.until(lambda _: page.one("#viewer").get_attribute("open") is not None)
    viewer_caps = [li.get_attribute("textContent") for li in page.all("#viewer-captions li")]
    assert MARKUP_CAPTION in viewer_caps
    assert page.all("#viewer b, #viewer-captions script") == []
    page.one("#viewer-close").click()


def test_keyboard_opens_the_full_image_with_captions_and_metadata(page, api):
    page.open("/?q=teal&k=4", state="done")
    first = page.card_ids()[0]
    item = api.get(f"/collections/test/items/{first}").json()
    thumb = page.one(f'#results .card[data-image-id="{first}"] .thumb')
    # the alt text is the image's first caption
    assert thumb.find_element(page.By.TAG_NAME, "img").get_attribute("alt") == item["captions"][0]
    thumb.send_keys(Keys.ENTER)
    page.wait.until(lambda _: page.one("#viewer").get_attribute("open") is not None)
    assert page.one("#viewer-title").text == first
    assert urlparse(page.one("#viewer-img").get_attribute("src")).path == item["image_url"]
    assert page.wait_images_loaded("#viewer-img")[0] > 0
    assert [li.text for li in page.all("#viewer-captions li")] == item["captions"]
    meta = dict(zip([dt.text for dt in page.all("#viewer-meta dt")], [dd.text for dd in page.all("#viewer-meta dd")]))
    assert meta == {k: str(v) for k, v in item["metadata"].items()}
    page.d.switch_to.active_element.send_keys(Keys.ESCAPE)
    page.wait.until(lambda _: page.one("#viewer").get_attribute("open") is None)
    # Tab reaches the search box, the results and their buttons
    reached = set()
    body = page.one("body")
    for _ in range(12):
        body = page.d.switch_to.active_element
        body.send_keys(Keys.TAB)
        active = page.d.switch_to.active_element
        reached.add(active.get_attribute("id") or active.get_attribute("class"))
    assert {"thumb", "like"} <= reached, reached


def test_collection_picker_and_metadata_filter(page, api):
    page.open("/?q=red&k=12", state="done")
    picker = page.one("#collection")
    assert picker.is_displayed()
    assert page.after_search(lambda: Select(picker).select_by_value("small")) == "done"
    assert page.card_ids() == _ids(api.post("/search/text", json={"query": "red", "k": 12, "collection": "small"}))
    assert parse_qs(urlparse(page.d.current_url).query)["collection"] == ["small"]
    assert page.after_search(lambda: Select(picker).select_by_value("test")) == "done"
    fields = {c["name"]: c["metadata_fields"] for c in api.get("/collections").json()["collections"]}["test"]
    assert "kind" in fields and "stripes" in fields["kind"]
    kind = page.one('#filters select[data-field="kind"]')
    assert page.after_search(lambda: Select(kind).select_by_visible_text("stripes")) == "done"
    expected = _ids(api.post("/search/text", json={"query": "red", "k": 12, "filter": {"kind": "stripes"}}))
    assert page.card_ids() == expected and all("_stripes_" in i for i in expected)
    assert parse_qs(urlparse(page.d.current_url).query)["f.kind"] == ["stripes"]
    page.d.refresh()  # the filter is kept in the URL too
    page.wait_state("done")
    assert page.card_ids() == expected


def test_usable_at_phone_width(page, api):
    page.d.set_window_size(390, 844)
    page.open("/?q=yellow&k=6", state="done")
    assert len(page.card_ids()) == 6
    overflow = page.d.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow} px at 390 px wide"
    for css in ("#q", "#search-form button", "label[for=file]", "#results .card .like"):
        assert page.one(css).is_displayed(), css
    cols = page.d.execute_script(
        "return getComputedStyle(document.getElementById('results')).gridTemplateColumns.split(' ').length")
    assert cols == 2
