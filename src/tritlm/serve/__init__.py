"""OpenAI-compatible HTTP server: ``tritlm serve MODEL`` or :func:`serve` / :func:`create_app`.

The engine (``tritlm.serve.engine``) needs only torch; the HTTP layer (``tritlm.serve.app``) needs the
``serve`` extra (fastapi, uvicorn), so it is imported on first use.
"""

from __future__ import annotations

from typing import Any

from tritlm.serve.engine import Backend, Engine, backend_for

_APP_NAMES = {"create_app", "serve", "ServeSettings", "ServerThread", "build_app_for_model"}


def __getattr__(name: str) -> Any:
    if name in _APP_NAMES:
        from tritlm.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'tritlm.serve' has no attribute {name!r}")


__all__ = ["Backend", "Engine", "ServeSettings", "ServerThread", "backend_for", "build_app_for_model", "create_app",
           "serve"]
