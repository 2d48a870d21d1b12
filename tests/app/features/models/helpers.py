"""Helpers shared by the model tests: the real pipeline lock held, requests started as
tasks (the load request itself is ``tests.api.post_load``)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from app.cores.model_manager.model_manager import ModelManager


@contextmanager
def pipeline_lock_held(app: FastAPI) -> Iterator[ModelManager]:
    """Hold the real pipeline lock: every load/unload/generation worker waits for it."""
    manager: ModelManager = app.state.model_manager
    with manager.held():
        yield manager


def start(coroutine: Coroutine[Any, Any, httpx.Response]) -> asyncio.Task[httpx.Response]:
    return asyncio.ensure_future(coroutine)
