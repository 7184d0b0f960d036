"""The `clipsearch` command: every subcommand's help, `search` without a server, `serve`'s fast refusals,
the watcher beside the server, and scripts/_env.sh installing only when the project changed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from clipsearch import keys
from offline import console, serve

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (keys.KEYS_FILE_VAR, *keys.ENV_KEYS, "CLIPSEARCH_AUTH", "HOST", "PORT")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"  # no hub: the no-model answer must not wait on a network timeout
    return {**env, **extra}


def _commands() -> list[str]:
    sub = next(a for a in console.build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return list(sub.choices)


def test_every_subcommand_has_help_for_users(capsys):
    commands = _commands()
    assert {"serve", "search", "ingest", "build", "evaluate", "hubness", "finetune", "migrate"} <= set(commands)
    with pytest.raises(SystemExit) as exc:
        console.main(["--help"])
    assert exc.value.code == 0
    top = capsys.readouterr().out
    assert "tests" not in top and "main(argv)" not in top
    for name in commands:
        with pytest.raises(SystemExit) as exc:
            console.main([name, "--help"])
        assert exc.value.code == 0, name
        text = capsys.readouterr().out
        assert text.startswith(f"usage: clipsearch {name}"), name
    with pytest.raises(SystemExit):
        console.main(["hubness", "--help"])
    hub = capsys.readouterr().out
    assert "--bank-split" in hub


def test_python_m_offline_help_keeps_working_and_reads_for_users():
    run = subprocess.run([sys.executable, "-m", "offline", "--help"], capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert run.returncode == 0
    assert "usage: python -m offline" in run.stdout and "main(argv)" not in run.stdout
    assert "tests call" not in run.stdout
    assert "image → caption" in run.stdout and "text → image" in run.stdout  # hubness: both directions


def test_console_script_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'clipsearch = "offline.console:main"' in text


# --- serve: the answers that must come in seconds ----------------------------------------------------------

def _serve(args: list[str], cwd: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    t = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "offline.console", "serve", *args], cwd=cwd, capture_output=True,
                         text=True, env=_env(**env), timeout=120)
    return run, time.perf_counter() - t


def test_serve_refuses_a_public_host_without_keys(tmp_path):
    run, _ = _serve(["--host", "0.0.0.0", "--out", str(tmp_path / "art")], tmp_path)
    assert run.returncode == 2
    err = run.stderr.strip()
    assert len(err.splitlines()) == 1
    assert "clipsearch keys add NAME --scope admin --file keys.txt" in err and "CLIPSEARCH_API_KEYS_FILE=keys.txt" in err
    assert not (tmp_path / "art").exists()  # refused before anything was made


@pytest.mark.parametrize("host,ok", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.0.5", True),
                                     ("0.0.0.0", False), ("192.168.1.4", False), ("::", False), ("example.org", False)])
def test_bind_check(host, ok):
    assert keys.bind_is_loopback(host) is ok
    if ok:
        serve.check_bind(host, False, {})
    else:
        with pytest.raises(serve.ServeError):
            serve.check_bind(host, False, {})
        serve.check_bind(host, True, {})  # --insecure-no-auth
        serve.check_bind(host, False, {"CLIPSEARCH_AUTH": "off"})
        for var in (keys.KEYS_FILE_VAR, *keys.ENV_KEYS):
            serve.check_bind(host, False, {var: "x" * 20})


def test_serve_without_a_model_says_so_in_seconds(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(photos / "a.png")
    run, seconds = _serve([str(photos), "--out", str(tmp_path / "art")], tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "no model built yet" in run.stderr and "--data" in run.stderr
    assert seconds < 30, seconds  # torch's import is most of it; nothing is loaded or embedded


def test_serve_with_nothing_to_serve(tmp_path):
    run, _ = _serve(["--out", str(tmp_path / "art")], tmp_path)
    assert run.returncode == 2 and "nothing to serve yet" in run.stderr


def test_pretrained_alone_reads_the_checkpoints_sidecar(tmp_path):
    from clipsearch.models import checkpoint_model

    ckpt = tmp_path / "models" / "mine-ft.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights")
    with pytest.raises(serve.ServeError, match="pass --model NAME"):
        serve.resolve_model(None, str(ckpt))
    ckpt.with_suffix(".json").write_text(json.dumps({"model": "lit-effnet1-minilm", "checkpoint_sha256": "ab"}))
    assert checkpoint_model(ckpt) == "lit-effnet1-minilm"
    assert serve.resolve_model(None, str(ckpt)) == ("lit-effnet1-minilm", str(ckpt))
    assert serve.resolve_model("ViT-B-32", str(ckpt)) == ("ViT-B-32", str(ckpt))  # an explicit --model wins
    assert serve.resolve_model(None, "openai") == (None, "openai")


def test_ingest_with_pretrained_alone_loads_by_its_sidecar(tmp_path, tiny_checkpoint, capsys):
    """`--pretrained CKPT` without --model: the sidecar names test-tiny-vit, so it loads; the full load
    error (every missing key, and the fix) when the sidecar names the wrong model."""
    from offline.cli import main

    ckpt = tmp_path / "tiny-ft.pt"
    shutil.copy(tiny_checkpoint, ckpt)
    ckpt.with_suffix(".json").write_text(json.dumps({"model": "test-tiny-vit"}))
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (90 * i, 10, 10)).save(photos / f"p{i}.png")
    argv = ["ingest", str(photos), "--out", str(tmp_path / "art"), "--pretrained", str(ckpt),
            "--image-backend", "torch", "--text-backend", "torch", "--workers", "0", "--threads", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    # weights that are not quite test-tiny-vit's: every missing and unexpected key is listed, then the fix
    import torch

    state = torch.load(ckpt, weights_only=True)
    state["not_a_clip_tensor"] = state.pop("logit_scale")
    torch.save(state, ckpt)
    assert main([*argv, "--out", str(tmp_path / "art2")]) == 2
    err = capsys.readouterr().err
    assert "Missing key(s)" in err and '"logit_scale"' in err and '"not_a_clip_tensor"' in err
    assert "does not load as test-tiny-vit" in err and "the .json beside it names this model" in err
    ckpt.with_suffix(".json").unlink()
    assert main([*argv, "--model", "test-tiny-vit", "--out", str(tmp_path / "art3")]) == 2
    assert "pass the --model the checkpoint was trained as" in capsys.readouterr().err


# --- the watcher beside the server -------------------------------------------------------------------------

def test_watch_command_is_the_offline_watch_stage(tmp_path):
    cmd = serve.watch_command(tmp_path / "photos", "photos", tmp_path / "art")
    assert cmd[:4] == [sys.executable, "-m", "offline", "watch"]
    assert cmd[4:] == [str(tmp_path / "photos"), "--collection", "photos", "--out", str(tmp_path / "art")]
    with_model = serve.watch_command(tmp_path / "photos", "photos", tmp_path / "art", "lit-effnet1-minilm", "/m/x.pt")
    assert with_model[-4:] == ["--model", "lit-effnet1-minilm", "--pretrained", "/m/x.pt"]


def test_watcher_stops_with_the_server(tmp_path):
    pid_file = tmp_path / "child.pid"
    child = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                                   "time.sleep(120)"]

    def server():  # stands in for uvicorn: returns once the child has started
        for _ in range(200):
            if pid_file.exists() and pid_file.read_text():
                return
            time.sleep(0.05)

    serve.serve_beside(server, child)
    pid = int(pid_file.read_text())
    assert not _alive(pid)


def test_sigterm_stops_server_and_watcher(tmp_path):
    """SIGTERM to `serve` (docker stop, systemd) ends the watcher too."""
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import sys, time
        from offline import serve
        child = [sys.executable, "-c", "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"]
        serve.serve_beside(lambda: time.sleep(120), child)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env())
    for _ in range(400):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by a parent that is gone) counts as stopped
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_watch_command_is_the_offline_watch_stage(tmp_path):
    from offline.cli import build_parser

    cmd = serve.watch_command(tmp_path / "photos", "photos", tmp_path / "art", "lit-effnet1-minilm", "ckpt.pt")
    assert cmd[1:4] == ["-m", "offline", "watch"]
    args = build_parser().parse_args(cmd[3:])
    assert (args.command, args.collection, args.model, args.pretrained) == ("watch", "photos", "lit-effnet1-minilm",
                                                                            "ckpt.pt")
    assert Path(args.source) == tmp_path / "photos" and Path(args.out) == tmp_path / "art"


# --- scripts/_env.sh: install only when the project changed ------------------------------------------------

def test_env_installs_only_when_the_project_changed(tmp_path):
    for rel in ("pyproject.toml", "constraints.txt", "scripts/_env.sh"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    log = tmp_path / "pip.log"
    fake = tmp_path / "python"
    # a Python that records pip calls instead of running them and fails the import check on demand
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$*" >> {log}; exit 0; fi
        if [ "$1" = "-I" ] && [ -n "$FAKE_NOT_INSTALLED" ]; then exit 1; fi
        if [ "$1" = "-c" ] && [ "$2" = "import torch" ]; then exit 0; fi  # torch is there: no CPU-wheel step
        exec {sys.executable} "$@"
        """))
    fake.chmod(0o755)
    env = _env(PYTHON=str(fake), CLIPSEARCH_STAMP_DIR=str(tmp_path / "stamps"))

    def setup(extras: str = "", **more: str) -> int:
        log.write_text("")
        subprocess.run(["bash", "-c", f'set -e; . scripts/_env.sh; setup_env "{extras}" 1'], cwd=tmp_path,
                       env={**env, **more}, check=True, capture_output=True, timeout=120)
        return sum("install" in line and "-e ." in line for line in log.read_text().splitlines())

    assert setup() == 1  # first time: installs and stamps
    assert setup() == 0  # nothing changed
    assert setup(FAKE_NOT_INSTALLED="1") == 1  # stamped, but the package does not import: install
    with open(tmp_path / "constraints.txt", "a") as f:
        f.write("\n# changed\n")
    assert setup() == 1  # a dependency changed
    assert setup() == 0
    assert setup("[test]") == 1  # the test extras are more than the plain install
    assert setup("[test]") == 0
    (tmp_path / "pyproject.toml").write_text((tmp_path / "pyproject.toml").read_text() + "\n")
    assert setup("[test]") == 1
    assert setup() == 0  # the test extras' stamp covers a plain install
