"""Run the service under uvicorn on 127.0.0.1 for the loopback tests (soak, overload, faults).

    python tests/app/serve_for_tests.py --fake DATA_DIR [--encode-delay S] [--set NAME=VALUE ...]
    python tests/app/serve_for_tests.py --real            # app.main:app, configured by the environment

It binds a free port itself and prints `PORT <n>` as its first line, so no port is ever raced for.
`--fake` serves the deterministic fake encoder over the conftest dataset written to DATA_DIR.
Not a test module; only the tests start it.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]


def _fake_app(data_dir: Path, delay: float, overrides: dict[str, Any]):
    from conftest import ColorEncoder, fake_resources, make_dataset, settings_for

    from app.main import create_app

    class SlowEncoder(ColorEncoder):
        """The fake encoder, plus a fixed delay per call that stands in for a real model's work."""

        def encode_texts(self, texts):
            time.sleep(delay)
            return super().encode_texts(texts)

        def encode_images(self, images, tta=True):
            time.sleep(delay)
            return super().encode_images(images, tta)

    dataset = make_dataset(data_dir / "images")
    encoder = SlowEncoder() if delay else ColorEncoder()
    settings = settings_for(data_dir, **overrides)
    return create_app(settings, fake_resources(dataset, encoder))


def main() -> None:
    parser = argparse.ArgumentParser()
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--fake", type=Path, metavar="DATA_DIR")
    mode.add_argument("--real", action="store_true")
    parser.add_argument("--encode-delay", type=float, default=0.0)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()

    import uvicorn

    if args.real:
        from app.main import app
    else:
        overrides = dict(item.split("=", 1) for item in args.set)
        app = _fake_app(args.fake, args.encode_delay, overrides)

    # proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # every keep-alive response (headers and body are two writes) waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30,
                            backlog=256)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
