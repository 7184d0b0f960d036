"""The search page in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`)
driven by Selenium against the real app served by uvicorn on 127.0.0.1 in a thread of the test process.

- `page_server`: the app over the fake encoder (tests/app/conftest.py) on the 12 tiny images, with one
  caption holding markup, plus a second collection `small` (so the page shows its collection picker).
- `serve(app)`: any other app (not ready, overloaded) on its own port, stopped after the test.
- `browser`: one Chromium for the whole run (a few seconds to start), with a `Page` helper per test.

Without chromium and chromedriver on the machine the browser tests are skipped with the reason;
CI (.ci/run) installs both, so there they run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import httpx
import pytest

APP_CONFTEST = Path(__file__).resolve().parents[1] / "app" / "conftest.py"
MARKUP_CAPTION = "<script>document.title='pwned'</script><b>x</b> red marker"
MARKUP_IMAGE = "00_solid_red.png"
WAIT_S = 15


def _load_app_fakes() -> ModuleType:
    """tests/app/conftest.py (the fake encoder and dataset) under its own module name: every
    conftest.py is imported as `conftest`, so a plain import would be ambiguous."""
    spec = importlib.util.spec_from_file_location("clipsearch_app_fakes", APP_CONFTEST)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def app_fakes() -> ModuleType:
    return _load_app_fakes()


class ThreadServer:
    """uvicorn serving `app` on a free 127.0.0.1 port in a daemon thread (the socket is bound
    before the thread starts, so no port is raced for)."""

    def __init__(self, app: Any):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="page-test-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn exited during start-up"
            assert time.monotonic() < deadline, "uvicorn did not start in 30 s"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@pytest.fixture(scope="session")
def page_data(tmp_path_factory: pytest.TempPathFactory, app_fakes: ModuleType) -> SimpleNamespace:
    images, texts = app_fakes.make_dataset(tmp_path_factory.mktemp("page-images"))
    texts = [*texts, {"caption_id": f"{MARKUP_IMAGE}#9", "image_id": MARKUP_IMAGE, "caption": MARKUP_CAPTION}]
    small = (images[:6], [t for t in texts if t["image_id"] in {r["image_id"] for r in images[:6]}])
    return SimpleNamespace(dataset=(images, texts), small=small, dir=Path(images[0]["image_path"]).parent,
                           markup_caption=MARKUP_CAPTION, markup_image=MARKUP_IMAGE)


@pytest.fixture(scope="session")
def page_server(tmp_path_factory: pytest.TempPathFactory, app_fakes: ModuleType, page_data) -> Iterator[ThreadServer]:
    from app.main import create_app

    stores = [app_fakes.fake_store(page_data.dataset, name="test"),
              app_fakes.fake_store(page_data.small, name="small")]
    resources = app_fakes.fake_resources(page_data.dataset, stores=stores)
    settings = app_fakes.settings_for(tmp_path_factory.mktemp("page-app"))
    server = ThreadServer(create_app(settings, resources))
    yield server
    server.stop()


@pytest.fixture
def serve() -> Iterator[Callable[[Any], ThreadServer]]:
    servers: list[ThreadServer] = []

    def start(app: Any) -> ThreadServer:
        servers.append(ThreadServer(app))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def api(page_server: ThreadServer) -> Iterator[httpx.Client]:
    """A plain HTTP client on the same server: what the page shows is compared with its answers."""
    with httpx.Client(base_url=page_server.url, timeout=30) as client:
        yield client


def _find(name: str, env: str, *candidates: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    for candidate in (name, *candidates):
        found = shutil.which(candidate)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def driver() -> Iterator[Any]:
    chromium = _find("chromium", "CHROMIUM_BIN", "chromium-browser", "google-chrome")
    chromedriver = _find("chromedriver", "CHROMEDRIVER_BIN")
    if chromium is None or chromedriver is None:
        pytest.skip("headless browser tests need chromium and chromedriver (Debian: apt-get install "
                    "chromium chromium-driver; .ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the [test] extras")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--disable-extensions", "--no-first-run", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    drv = webdriver.Chrome(options=options, service=Service(chromedriver))
    drv.set_script_timeout(WAIT_S)
    yield drv
    drv.quit()


class Page:
    """The search page in the shared browser, with waits keyed on the page's own data-state/data-done."""

    def __init__(self, driver: Any, base_url: str):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.d = driver
        self.url = base_url
        self.By = By
        self.wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.05)

    def open(self, path: str = "/", state: str | tuple[str, ...] = ("idle", "done")) -> None:
        self.d.get(self.url + path)
        self.wait_state(state)

    def state(self) -> str:
        return self.d.execute_script("return document.body.dataset.state || ''")

    def done(self) -> int:
        return int(self.d.execute_script("return document.body.dataset.done || '0'"))

    def wait_state(self, state: str | tuple[str, ...]) -> None:
        wanted = (state,) if isinstance(state, str) else state
        self.wait.until(lambda _: self.state() in wanted, f"page never reached state {wanted}")

    def after_search(self, action: Callable[[], None]) -> str:
        """Run `action` and wait for the search it starts to finish; the page's final state."""
        before = self.done()
        action()
        self.wait.until(lambda _: self.done() > before and self.state() in ("done", "error"),
                        "the search never finished")
        return self.state()

    def one(self, css: str) -> Any:
        return self.d.find_element(self.By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[Any]:
        return self.d.find_elements(self.By.CSS_SELECTOR, css)

    def card_ids(self) -> list[str]:
        return [c.get_attribute("data-image-id") for c in self.all("#results .card")]

    def wait_images_loaded(self, css: str) -> list[int]:
        """naturalWidth of every image matching `css`, once each has finished loading."""
        script = ("return Array.from(document.querySelectorAll(arguments[0]))"
                  ".map(i => i.complete ? i.naturalWidth : -1)")
        self.wait.until(lambda _: all(w >= 0 for w in self.d.execute_script(script, css)),
                        f"images {css} never finished loading")
        return self.d.execute_script(script, css)

    def csp_violations(self) -> list[str]:
        return [e["message"] for e in self.d.get_log("browser") if "Content Security Policy" in e["message"]]


@pytest.fixture
def page(driver: Any, page_server: ThreadServer) -> Page:
    driver.set_window_size(1280, 900)
    driver.get_log("browser")  # drop the previous test's console
    return Page(driver, page_server.url)
