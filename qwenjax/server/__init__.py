"""The OpenAI-compatible server: `build_app(engine, ServerConfig(...))`, run by `python -m launch.serve`."""

from qwenjax.server.app import ServerConfig, build_app

__all__ = ["ServerConfig", "build_app"]
