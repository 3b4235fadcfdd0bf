"""OpenAI-compatible server: `build_app(ServeConfig)` / `run_server(ServeConfig)`."""

from omnimini.serve.config import ServeConfig, add_serve_args, serve_config_from_args

__all__ = ["ServeConfig", "add_serve_args", "serve_config_from_args"]
