"""Mirror test-time augmentation of image embeddings (`ModelIdentity.image_tta`, `ClipEncoder`)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from clipsearch.encoder import ClipEncoder
from clipsearch.models import ModelIdentity, ModelLoadError, load_model
from tests.conftest import COLORS, make_image


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    plain = load_model("test-tiny-vit", None, "cpu")
    mirrored = load_model("test-tiny-vit", None, "cpu", image_tta="mirror")
    mirrored.model.load_state_dict(plain.model.state_dict())
    return plain, mirrored


def _asymmetric(size: tuple[int, int]) -> Image.Image:
    im = make_image(COLORS["red"], "square", 48).resize(size)
    im.paste((20, 20, 200), (0, 0, size[0] // 3, size[1]))  # a blue band on the left only
    return im


def test_mirror_is_the_normalised_mean_of_the_image_and_its_mirror(pair):
    plain, mirrored = pair
    # sizes whose centre crop is symmetric (an odd leftover shifts the crop by one pixel: see encoder)
    images = [_asymmetric((60, 48)), _asymmetric((40, 40)), make_image(COLORS["green"], "circle")]
    want = ClipEncoder(plain).encode_images(images) + ClipEncoder(plain).encode_images(
        [ImageOps.mirror(im) for im in images])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    got = ClipEncoder(mirrored).encode_images(images)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # an image and its mirror now embed alike, which the plain model does not do for this image
    flipped = ClipEncoder(mirrored).encode_images([ImageOps.mirror(images[0])])
    assert float(got[0] @ flipped[0]) > 0.99999
    plain_pair = ClipEncoder(plain).encode_images([images[0], ImageOps.mirror(images[0])])
    assert float(plain_pair[0] @ plain_pair[1]) < 0.9999


def test_tta_false_embeds_plain_as_a_query_does(pair):
    plain, mirrored = pair
    images = [_asymmetric((60, 48)), make_image(COLORS["green"], "circle")]
    np.testing.assert_allclose(ClipEncoder(mirrored).encode_images(images, tta=False),
                               ClipEncoder(plain).encode_images(images), atol=1e-6)
    pixels = torch.stack([mirrored.preprocess(im) for im in images])
    np.testing.assert_allclose(ClipEncoder(mirrored).encode_pixels(pixels, tta=False).numpy(),
                               ClipEncoder(plain).encode_pixels(pixels).numpy(), atol=1e-6)


def test_the_identity_records_the_augmentation_and_keeps_old_manifests_matching(pair):
    plain, mirrored = pair
    assert "image_tta" not in plain.identity.to_dict()  # manifests written before it still compare equal
    assert mirrored.identity.to_dict()["image_tta"] == "mirror"
    assert plain.identity.same_weights(plain.identity.to_dict())
    assert not plain.identity.same_weights(mirrored.identity.to_dict())
    assert not mirrored.identity.same_weights(plain.identity.to_dict())
    assert ModelIdentity("m", None, None, 8).same_weights({"model": "m", "pretrained": None, "embed_dim": 8,
                                                           "image_tta": None})
    with pytest.raises(ModelLoadError, match="unknown image test-time augmentation"):
        load_model("test-tiny-vit", None, "cpu", image_tta="rotate")


def test_auto_means_mirror_for_the_offline_model_only():
    from offline.cli import image_tta

    def ns(model, choice):
        return argparse.Namespace(model=model, image_tta=choice)

    assert image_tta(ns("lit-effnet-minilm", "auto")) == "mirror"
    assert image_tta(ns("lit-effnet1-minilm", "auto")) == "mirror"
    assert image_tta(ns("ViT-B-32", "auto")) is None
    assert image_tta(ns("lit-effnet-minilm", "none")) is None
    assert image_tta(ns("ViT-B-32", "mirror")) == "mirror"
