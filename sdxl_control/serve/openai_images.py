"""OpenAI's images API (``/v1/images/generations``, ``/v1/images/edits``) as a front-end: each request translated
into one :class:`~sdxl_control.jobs.spec.JobSpec` for the server's job service."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter

if TYPE_CHECKING:
    from .app import ServerState

__all__ = ["router"]


def router(state: ServerState) -> APIRouter:
    """The ``/v1/images`` routes on the server's ``state``."""
    return APIRouter(prefix="/v1/images")
