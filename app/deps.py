"""The dependencies routes declare (the FastAPI template's `deps.py`): `EngineDep` is the service's
engine, so a handler reads `engine: EngineDep` instead of reaching into `request.app.state`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.engine import Engine


async def get_engine(request: Request) -> Engine:
    # async: FastAPI runs a plain `def` dependency on its thread pool, one hop per request for a lookup
    return request.app.state.service


EngineDep = Annotated[Engine, Depends(get_engine)]
