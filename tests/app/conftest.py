"""Fakes and tiny fixtures for the service tests.

- `make_dataset`: 12 tiny PNGs (solid colours and two-colour patterns) with 2-3 captions each.
- `ColorEncoder`: a deterministic fake encoder whose vectors depend on the colour words of a text and
  the palette colours of an image (plus a little hash noise so no two scores tie), so API tests can
  predict and assert exact rankings.
- `fake_store` / `fake_resources`: an in-memory collection of that dataset over the fake encoder's vectors.
- `build_artifacts`: a collection on disk as `offline ingest` writes it (ARTIFACTS_DIR/collections/<name>/
  catalog.sqlite), embedded with the real tiny open_clip model `test-tiny-vit`.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from numpy.typing import NDArray
from PIL import Image

from clipsearch.artifacts import ArtifactLayout
from clipsearch.encoder import ClipEncoder
from clipsearch.models import load_model
from clipsearch.store import Catalog, FaissStore, NewItem

from app.config import Settings
from app.main import create_app
from app.resources import Resources, make_resources

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30), "green": (20, 160, 40), "blue": (30, 40, 220), "yellow": (240, 220, 20),
    "purple": (120, 30, 160), "orange": (250, 140, 0), "white": (250, 250, 250), "black": (5, 5, 5),
    "gray": (128, 128, 128), "pink": (250, 150, 200), "brown": (110, 60, 20), "teal": (0, 128, 128),
}
COLORS = list(PALETTE)
SOLID = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
PATTERNS = [("stripes", "gray", "pink"), ("checkerboard", "brown", "teal"),
            ("stripes", "red", "white"), ("checkerboard", "black", "yellow")]
SIZE = 32
LOOPBACK = ("127.0.0.1", 50000)  # TestClient(client=LOOPBACK): a peer on this machine


def _image(kind: str, a: str, b: str | None = None) -> Image.Image:
    arr = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    arr[:] = PALETTE[a]
    if kind == "stripes":
        arr[:, (np.arange(SIZE) // 4) % 2 == 1] = PALETTE[b]
    elif kind == "checkerboard":
        yy, xx = np.mgrid[:SIZE, :SIZE]
        arr[((yy // 8) + (xx // 8)) % 2 == 1] = PALETTE[b]
    return Image.fromarray(arr, "RGB")


def make_dataset(folder: Path) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Write the 12 images to `folder`; return (images.json rows, texts.json rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    images, texts = [], []
    specs: list[tuple[str, str, str | None]] = [("solid", c, None) for c in SOLID] + list(PATTERNS)
    for i, (kind, a, b) in enumerate(specs):
        image_id = f"{i:02d}_{kind}_{a}{'_' + b if b else ''}.png"
        path = folder / image_id
        _image(kind, a, b).save(path)
        images.append({"image_id": image_id, "image_path": str(path.resolve())})
        if b is None:
            caps = [f"a plain {a} square", f"the colour {a} fills everything"]
            if i % 2 == 0:
                caps.append(f"nothing but {a}")
        else:
            caps = [f"{a} and {b} {kind}", f"a {kind} pattern in {b} and {a}", f"{kind} of {a} with {b}"]
        for j, cap in enumerate(caps):
            texts.append({"caption_id": f"{image_id}#{j}", "image_id": image_id, "caption": cap})
    return images, texts


def _hash_unit(key: bytes, dim: int) -> NDArray[np.float32]:
    seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


class ColorEncoder:
    """Deterministic fake of the encoder contract: colour words / palette colours + hash noise."""

    NOISE = 0.15
    dim = len(PALETTE) + 4

    def __init__(self) -> None:
        self.text_calls = 0
        self.image_calls = 0
        self.tta_calls: list[bool] = []

    def _finish(self, concept: NDArray[np.float32], key: bytes) -> NDArray[np.float32]:
        v = concept + self.NOISE * _hash_unit(key, self.dim)
        return (v / np.linalg.norm(v)).astype(np.float32)

    def text_vector(self, text: str) -> NDArray[np.float32]:
        concept = np.zeros(self.dim, dtype=np.float32)
        for word in text.lower().replace(",", " ").split():
            if word in PALETTE:
                concept[COLORS.index(word)] = 1.0
        return self._finish(concept, text.encode())

    def image_vector(self, image: Image.Image) -> NDArray[np.float32]:
        px = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
        pal = np.array(list(PALETTE.values()), dtype=np.float32)
        nearest = ((px[:, None, :] - pal[None]) ** 2).sum(-1).argmin(1)
        share = np.bincount(nearest, minlength=len(pal)) / len(px)
        concept = np.zeros(self.dim, dtype=np.float32)
        concept[: len(pal)] = (share >= 0.1).astype(np.float32)
        return self._finish(concept, np.asarray(image).tobytes())

    def encode_texts(self, texts: Sequence[str]) -> NDArray[np.float32]:
        self.text_calls += 1
        return np.stack([self.text_vector(t) for t in texts]).reshape(len(texts), self.dim)

    def encode_images(self, images: Sequence[Image.Image], tta: bool = True) -> NDArray[np.float32]:
        self.image_calls += 1
        self.tta_calls.append(tta)  # queries embed plain (tta False), stored images as ingest does
        return np.stack([self.image_vector(im) for im in images]).reshape(len(images), self.dim)


class GatedEncoder(ColorEncoder):
    """Blocks inside encode until `release` is set, to hold a request in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def encode_texts(self, texts: Sequence[str]) -> NDArray[np.float32]:
        self.entered.set()
        assert self.release.wait(10), "test never released the gated encoder"
        return super().encode_texts(texts)


class BrokenEncoder(ColorEncoder):
    def encode_texts(self, texts: Sequence[str]) -> NDArray[np.float32]:
        raise RuntimeError("secret internal detail /srv/models/x.pt")


FAKE_MODEL = {"model": "fake-color", "pretrained": None, "checkpoint_sha256": None,
              "embed_dim": ColorEncoder.dim}


def _items(dataset: tuple[list[dict], list[dict]], image_vecs: np.ndarray, text_vecs: np.ndarray) -> list[NewItem]:
    """The dataset as collection items: captions grouped by image in file order, `kind` as metadata."""
    image_rows, text_rows = dataset
    rows_of: dict[str, list[int]] = {}
    for j, r in enumerate(text_rows):
        rows_of.setdefault(r["image_id"], []).append(j)
    items = []
    for i, r in enumerate(image_rows):
        js = rows_of.get(r["image_id"], [])
        items.append(NewItem(r["image_id"], r["image_path"], image_vecs[i],
                             captions=tuple(text_rows[j]["caption"] for j in js),
                             caption_vectors=text_vecs[js] if js else None,
                             caption_ids=tuple(text_rows[j]["caption_id"] for j in js),
                             metadata={"kind": r["image_id"].split("_")[1], "index": i}))
    return items


def fake_store(dataset: tuple[list[dict], list[dict]], name: str = "test",
               caption_offsets: np.ndarray | None = None, hubness: dict[str, Any] | None = None) -> FaissStore:
    """An in-memory collection over the fake encoder's vectors (exact search); `caption_offsets` (one per
    caption, in the dataset's order) as the hubness correction stores them."""
    image_rows, text_rows = dataset
    base = ColorEncoder()  # collection vectors do not count as calls on a test's encoder
    img_vecs = base.encode_images([Image.open(r["image_path"]) for r in image_rows])
    txt_vecs = base.encode_texts([r["caption"] for r in text_rows])
    store = FaissStore.in_memory(name, FAKE_MODEL, ColorEncoder.dim)
    store.add(_items(dataset, img_vecs, txt_vecs))
    if caption_offsets is not None:
        rows, _ = store.catalog.caption_vectors()
        store.catalog.set_caption_offsets(rows, np.asarray(caption_offsets, np.float32), hubness)
        store.add([])  # re-read the offsets
    return store


def fake_resources(dataset: tuple[list[dict], list[dict]], encoder: ColorEncoder | None = None,
                   images_dir: Path | None = None, caption_offsets: np.ndarray | None = None,
                   hubness: dict[str, Any] | None = None, stores: list[FaissStore] | None = None) -> Resources:
    """Resources serving the fake collection `test` (or `stores`) over `encoder`."""
    stores = stores or [fake_store(dataset, caption_offsets=caption_offsets, hubness=hubness)]
    return make_resources(encoder or ColorEncoder(), stores, FAKE_MODEL, images_dir=images_dir)


def build_artifacts(root: Path, dataset: tuple[list[dict], list[dict]], pretrained: str | None = None,
                    name: str = "tiny") -> Path:
    """Write the collection `name` as offline ingest writes it, with the real tiny model."""
    image_rows, text_rows = dataset
    loaded = load_model("test-tiny-vit", pretrained, device="cpu")
    encoder = ClipEncoder(loaded)
    img_vecs = encoder.encode_images([Image.open(r["image_path"]).convert("RGB") for r in image_rows])
    txt_vecs = encoder.encode_texts([r["caption"] for r in text_rows])
    with Catalog(ArtifactLayout(root).collection(name).catalog) as catalog:
        catalog.set_model(loaded.identity.to_dict(), encoder.dim)
        catalog.put(_items(dataset, img_vecs, txt_vecs))
    return root


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"artifacts_dir": tmp_path / "artifacts", "torch_threads": 1,
                              "inference_threads": 2, "device": "cpu"}
    values.update(overrides)
    return Settings(**values)


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


# Test modules reach the helpers through fixtures, not imports: several conftest.py files in one
# run share the module name "conftest", so `from conftest import ...` is ambiguous.
FAKES = SimpleNamespace(
    ColorEncoder=ColorEncoder, GatedEncoder=GatedEncoder, BrokenEncoder=BrokenEncoder,
    fake_resources=fake_resources, fake_store=fake_store, build_artifacts=build_artifacts, settings_for=settings_for,
    png_bytes=png_bytes, image=_image, PALETTE=PALETTE, FAKE_MODEL=FAKE_MODEL)


@pytest.fixture(scope="session")
def fakes() -> SimpleNamespace:
    return FAKES


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict]]:
    return make_dataset(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory, dataset) -> Path:
    """The collection 'tiny' embedded with the real tiny model; copy before breaking it."""
    return build_artifacts(tmp_path_factory.mktemp("artifacts"), dataset)


@pytest.fixture
def encoder() -> ColorEncoder:
    return ColorEncoder()


@pytest.fixture
def make_client(tmp_path: Path, dataset) -> Iterator[Callable[..., TestClient]]:
    """`make_client(resources=..., loader=..., encoder=..., headers=..., **settings_overrides)` -> a
    started TestClient (lifespan run) on a loopback peer, sending `headers` (e.g. a key) with every request. By default it serves fake resources over `encoder`; pass
    `resources=None` to load from `artifacts_dir` (or with `loader`) in the background."""
    with ExitStack() as stack:
        def make(resources: Resources | None | str = "fake", loader: Callable | None = None,
                 encoder: ColorEncoder | None = None, raise_server_exceptions: bool = True,
                 headers: dict[str, str] | None = None, **overrides: Any) -> TestClient:
            settings = settings_for(tmp_path, **overrides)
            if resources == "fake":
                resources = None if loader else fake_resources(dataset, encoder)
            app = create_app(settings, resources, loader=loader)
            # a loopback peer, as a browser on this machine: with no key configured the app answers
            # only loopback clients (app/auth.py), and TestClient's default peer is "testclient"
            return stack.enter_context(TestClient(app, raise_server_exceptions=raise_server_exceptions,
                                                  client=LOOPBACK, headers=headers))
        yield make


@pytest.fixture
def client(make_client, encoder: ColorEncoder) -> TestClient:
    return make_client(encoder=encoder)


class LoopbackServer:
    """A uvicorn subprocess on 127.0.0.1 (tests/app/serve_for_tests.py) and its memory readings."""

    def __init__(self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("serve_for_tests.py")), *args],
            stdout=subprocess.PIPE, stderr=self._log, env={**os.environ, **(env or {})})
        line = self.proc.stdout.readline().decode()  # type: ignore[union-attr]
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"server did not start: {line!r}\n{self.log()}")
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def memory_kib(self, field: str = "VmRSS") -> int:
        """VmRSS (resident now) or VmHWM (peak resident) of the server process, in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"{field} not in /proc/{self.pid}/status")

    def wait_ready(self, timeout: float = 60.0, expect: int = 200) -> dict:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"server exited:\n{self.log()}"
            try:
                r = httpx.get(self.url + "/readyz", timeout=5)
                if r.status_code == expect and (expect == 200 or not r.json()["reason"].startswith("loading")):
                    return r.json()
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"/readyz never answered {expect}:\n{self.log()}"
            time.sleep(0.1)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., LoopbackServer]]:
    """`start_server(*args, env=...)` -> a LoopbackServer, stopped after the test."""
    servers: list[LoopbackServer] = []

    def start(*args: str, env: dict[str, str] | None = None) -> LoopbackServer:
        server = LoopbackServer(args, tmp_path / f"server{len(servers)}.log", env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
