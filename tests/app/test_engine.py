"""The engine without HTTP: plain values in, plain values out, domain errors (no request, no app)."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest

from app.engine import Engine, ImageSource, TermInput
from app.errors import ApiError, NotFound, NotReady
from app.search import CaptionResult, ImageResult, Options


def _run(coro):
    return asyncio.run(coro)


@pytest.fixture
def engine(tmp_path, dataset, fakes):
    eng = Engine(fakes.settings_for(tmp_path), fakes.fake_resources(dataset, fakes.ColorEncoder()))
    yield eng
    eng.close()


def test_searches_return_pages_of_plain_results(engine, fakes):
    page = _run(engine.search_text("red", Options(None, 3)))
    assert page.stages is not None and page.default_collection == "test" and page.spec.collection == "test"
    assert [type(r) for r in page.results] == [ImageResult] * 3
    assert page.results[0].image_id == "00_solid_red.png" and [r.rank for r in page.results] == [1, 2, 3]
    assert page.results[0].captions and page.results[0].metadata["kind"] == "solid"
    again = _run(engine.search_text("red", Options(None, 3)))
    assert again.stages is None and again.results == page.results  # from the cache

    red = fakes.png_bytes(fakes.image("solid", "red"))
    caps = _run(engine.search_image(red, Options(None, 2, target="captions")))
    assert all(isinstance(r, CaptionResult) and r.image_id == "00_solid_red.png" for r in caps.results)
    same = _run(engine.search_image(ImageSource(base64=base64.b64encode(red).decode()),
                                    Options(None, 2, target="captions")))
    assert same.stages is None and same.results == caps.results  # the same bytes, one cache entry

    similar = _run(engine.search_similar("02_solid_blue.png", Options(None, 3)))
    assert "02_solid_blue.png" not in [r.image_id for r in similar.results]
    vec = fakes.ColorEncoder().text_vector("purple")
    assert _run(engine.search_vector(vec.tolist(), Options(None, 1))).results[0].image_id == "04_solid_purple.png"
    terms = [TermInput(1.0, text="red"), TermInput(0.5, image_id="02_solid_blue.png")]
    assert len(_run(engine.search_terms(terms, Options(None, 4))).results) == 4


def test_embeddings_are_the_models_vectors(engine, fakes):
    out = _run(engine.embed_texts(["red", "a blue square"]))
    np.testing.assert_allclose(out.vectors, fakes.ColorEncoder().encode_texts(["red", "a blue square"]), atol=1e-6)
    assert out.model["model"] == "fake-color" and "encode" in out.stages


def test_domain_errors_not_http(engine, tmp_path, fakes):
    with pytest.raises(NotFound):
        _run(engine.search_text("red", Options("nope", 3)))
    with pytest.raises(NotFound):
        _run(engine.search_similar("nope.png", Options(None, 3)))
    with pytest.raises(ApiError) as info:
        _run(engine.search_vector([0.0, 1.0], Options(None, 3)))
    assert info.value.code == "invalid_request" and info.value.status == 422
    with pytest.raises(NotFound):  # this engine was made without a write token
        _run(engine.delete("test", "00_solid_red.png"))
    idle = Engine(fakes.settings_for(tmp_path))
    with pytest.raises(NotReady):
        _run(idle.search_text("red", Options(None, 3)))
    idle.close()
