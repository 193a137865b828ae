"""The playground page at ``/``: pick the base model and loaded adapters, send one prompt or chat to all of
them, and watch the answers stream side by side with token counts and timings.

Plain HTML, CSS and JavaScript shipped in ``lorakit/serve/static/`` (no build step, nothing from a CDN);
the page talks to the same server's OpenAI-compatible routes.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from .engine import NotFoundError

router = APIRouter(include_in_schema=False)

# the only files served: a name in the URL never reaches the filesystem
_FILES = {"index.html": "text/html; charset=utf-8", "playground.js": "text/javascript; charset=utf-8",
          "playground.css": "text/css; charset=utf-8"}


def _static(name: str) -> Response:
    if name not in _FILES:
        raise NotFoundError(f"no playground file {name!r}")
    body = resources.files(__package__).joinpath("static", name).read_bytes()
    return Response(body, media_type=_FILES[name], headers={"Cache-Control": "no-cache"})


@router.get("/")
def page() -> Response:
    return _static("index.html")


@router.get("/static/{name}")
def static_file(name: str) -> Response:
    return _static(name)
