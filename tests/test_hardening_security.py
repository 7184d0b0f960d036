"""Static security checks of the deployment and the code: non-root container, read-only artifacts,
no pickle-based loading of untrusted files."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("app", "clipsearch", "offline", "benchmarks", "scripts")


def _python_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py"))


def test_container_runs_as_non_root():
    lines = [ln.strip() for ln in (REPO / "Dockerfile").read_text().splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    users = [ln.split(None, 1)[1].strip() for ln in instructions if ln.upper().startswith("USER ")]
    assert users, "Dockerfile never switches away from root"
    final = users[-1].split(":")[0]
    assert final not in ("root", "0"), final
    # the last USER comes after every RUN and before the CMD, so the service itself is not root
    last_user = max(i for i, ln in enumerate(instructions) if ln.upper().startswith("USER "))
    assert not any(ln.upper().startswith("RUN ") for ln in instructions[last_user + 1:])
    assert any(ln.upper().startswith("CMD ") for ln in instructions[last_user + 1:])


def test_compose_mounts_artifacts_read_only():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    api = compose["services"]["api"]
    mounts = [v for v in api["volumes"] if isinstance(v, str)]
    artifacts = [v for v in mounts if v.split(":")[1] == "/artifacts"]
    assert artifacts and all(v.endswith(":ro") for v in artifacts), artifacts
    assert all(v.endswith(":ro") or v.split(":")[1] == "/cache" for v in mounts), mounts
    assert api.get("read_only") is True
    assert str(api.get("user", "image default")).split(":")[0] not in ("root", "0")
    env = api.get("environment", {})
    assert "CLIPSEARCH_ADMIN_TOKEN" not in env  # the reload endpoint stays off unless chosen


def _calls(tree: ast.AST, module: str, attr: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
            value = node.func.value
            if isinstance(value, ast.Name) and value.id == module:
                yield node


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


def test_every_torch_load_is_weights_only():
    found = 0
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for call in _calls(tree, "torch", "load"):
            found += 1
            assert _keyword_is_true(call, "weights_only"), \
                f"{path.relative_to(REPO)}:{call.lineno}: torch.load without weights_only=True"
        for call in _calls(tree, "np", "load"):
            assert not _keyword_is_true(call, "allow_pickle"), \
                f"{path.relative_to(REPO)}:{call.lineno}: np.load with allow_pickle=True"
        for call in _calls(tree, "pickle", "load"):
            pytest.fail(f"{path.relative_to(REPO)}:{call.lineno}: pickle.load")
    assert found >= 1  # the scan does see the project's torch.load calls


def test_checkpoint_loading_goes_through_weights_only():
    """open_clip's loaders default to full pickle loading in some versions; ours pass weights_only."""
    src = (REPO / "clipsearch" / "models.py").read_text()
    for call in re.findall(r"(?:create_model_and_transforms|create_model|load_checkpoint)\([^)]*\)", src, re.S):
        if "pretrained" in call or "load_checkpoint(" in call:
            assert "weights_only=True" in call, call
