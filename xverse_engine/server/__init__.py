"""The OpenAI-compatible HTTP server (python -m xverse_engine.serve): the engine's process (or thread), routes,
metrics, page."""
from .app import create_app
from .engine_loop import EngineLoop
from .engine_process import EngineProcess
from .mailbox import NotReady, RequestGroup, ServerBusy
from .metrics import ServerMetrics

__all__ = ["create_app", "EngineLoop", "EngineProcess", "NotReady", "RequestGroup", "ServerBusy", "ServerMetrics"]
