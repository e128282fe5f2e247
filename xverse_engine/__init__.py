"""xverse_engine: a fast, readable inference engine for the XVERSE mixture-of-experts LLMs."""
from .engine.engine import Engine, RequestError
from .engine.outputs import RequestOutput, StreamDelta
from .sampling_params import SamplingParams

__all__ = ["Engine", "SamplingParams", "RequestOutput", "StreamDelta", "RequestError"]
__version__ = "0.1.0"
