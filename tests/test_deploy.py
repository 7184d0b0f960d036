"""`docker compose up` alone deploys: the one-shot build service's command, run here as compose runs it
(no Docker engine on our machines), builds the model and both collections; the api then loads them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from app.config import Settings
from app.resources import load_resources

REPO = Path(__file__).resolve().parents[1]


def _flickr_layout(root: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    (root / "Images").mkdir(parents=True)
    lines, ids = [], []
    for i in range(n):
        name = f"{i:04d}_x.jpg"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "Images" / name)
        ids.append(name)
        lines += [f"{name}#{k}\tpicture {i} caption {k}" for k in range(2)]
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    for split, part in (("train", ids[:6]), ("dev", ids[6:9]), ("test", ids[9:])):
        (root / f"Flickr_8k.{split}Images.txt").write_text("\n".join(part) + "\n")
    return root


def test_compose_api_waits_for_the_one_shot_build():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    build, api = compose["services"]["build"], compose["services"]["api"]
    assert "profiles" not in build  # `docker compose up` runs it
    assert api["depends_on"]["build"]["condition"] == "service_completed_successfully"
    assert "artifacts:/artifacts" in build["volumes"] and "artifacts:/artifacts:ro" in api["volumes"]
    assert "artifacts" in compose["volumes"]  # a named volume takes the image's owner (uid 10001)
    assert any(v.endswith(":/media:ro") for v in build["volumes"])
    env = build["environment"]
    assert env["CLIPSEARCH_BUILD_MODEL"] == "${MODEL:-}" and env["CLIPSEARCH_BUILD_PRETRAINED"] == "${PRETRAINED:-}"


def test_build_command_then_api_load(tmp_path, tiny_checkpoint):
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    command = compose["services"]["build"]["command"]
    assert command[:2] == ["sh", "-c"]
    data = _flickr_layout(tmp_path / "data")
    media = tmp_path / "media"
    (media / "trip").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((24, 24, 3), 60 * i, np.uint8)).save(media / "trip" / f"m{i}.png")
    art = tmp_path / "artifacts"
    # the container's paths, mapped onto this machine's; compose's $$ is a literal $
    script = command[2].replace("$$", "$").replace("/data", str(data)).replace("/media", str(media))
    env = {**os.environ, "ARTIFACTS_DIR": str(art), "PYTHON": sys.executable,
           "CLIPSEARCH_BUILD_MODEL": "test-tiny-vit", "CLIPSEARCH_BUILD_PRETRAINED": str(tiny_checkpoint)}
    run = subprocess.run(["sh", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (art / "model.json").is_file()
    res = load_resources(Settings(artifacts_dir=art, device="cpu", torch_threads=1,
                                  text_backend="torch", image_backend="torch"))
    assert set(res.collections) == {"flickr8k", "media"}
    assert res.store("flickr8k").count() == 12 and res.store("flickr8k").count("captions") == 24
    assert res.store("media").count() == 3
    assert res.store("flickr8k").get("0000_x.jpg").metadata == {"split": "train"}


def test_compose_api_needs_a_key_and_publishes_on_loopback():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name, port in (("api", "8000"), ("api-qdrant", "8001")):
        service = compose["services"][name]
        assert service["ports"] == [f"${{BIND:-127.0.0.1}}:{port}:8000"]
        assert service["environment"]["CLIPSEARCH_API_KEY"].startswith("${CLIPSEARCH_API_KEY:?")


def _compose_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed")
    clean = {k: v for k, v in os.environ.items() if k not in ("CLIPSEARCH_API_KEY", "BIND")}
    return subprocess.run([exe, "-f", str(REPO / "docker-compose.yml"), "config"], cwd=REPO,
                          env={**clean, **env}, capture_output=True, text=True, timeout=60)


def test_compose_config_refuses_to_start_without_a_key():
    run = _compose_config({})
    assert run.returncode != 0 and "set CLIPSEARCH_API_KEY" in run.stderr
    key = "compose-test-key-0123456789"
    run = _compose_config({"CLIPSEARCH_API_KEY": key})
    assert run.returncode == 0, run.stderr
    config = yaml.safe_load(run.stdout)
    api = config["services"]["api"]
    assert api["environment"]["CLIPSEARCH_API_KEY"] == key
    ports = api["ports"]
    published = [p if isinstance(p, str) else f"{p.get('host_ip')}:{p['published']}:{p['target']}" for p in ports]
    assert any(p.startswith("127.0.0.1:8000:8000") for p in published), published
    wide = yaml.safe_load(_compose_config({"CLIPSEARCH_API_KEY": key, "BIND": "0.0.0.0"}).stdout)
    assert any(str(p).startswith("0.0.0.0:8000") for p in wide["services"]["api"]["ports"]), wide["services"]["api"]
