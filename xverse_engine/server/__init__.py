"""The OpenAI-compatible HTTP server (python -m xverse_engine.serve): engine thread, routes, metrics, page."""
from .app import create_app
from .engine_loop import EngineLoop, NotReady, RequestGroup, ServerBusy
from .metrics import ServerMetrics

__all__ = ["create_app", "EngineLoop", "NotReady", "RequestGroup", "ServerBusy", "ServerMetrics"]
