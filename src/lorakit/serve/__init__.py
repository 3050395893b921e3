"""Serving a base model and many LoRA adapters over an OpenAI-compatible HTTP API.

    model, tokenizer = load_model("smollm2-135m")
    registry = AdapterRegistry(model, "smollm2-135m", max_adapters=8)
    registry.add("support", "runs/support")       # before start; later through engine.call(...)
    engine = Engine(model, tokenizer, registry, max_batch_size=32)
    with serving(create_app(engine, "smollm2-135m"), "127.0.0.1", 8000):  # lorakit.serve.server: HTTP in a thread
        engine.run()                                                      # the model in this one, until Ctrl-C

`Engine` batches requests for different adapters into one decode loop (continuous batching);
`create_app` is the FastAPI app; `AdapterRegistry` loads, evicts and reloads adapters.
FastAPI and uvicorn are needed only by `create_app` and `lorakit.serve.server` (`pip install 'lorakit[serve]'`).
"""

from .engine import Engine, EngineStats, GenerationRequest, Update
from .errors import AdapterError, BadRequest, NotFound, ServeError, Unauthorized
from .registry import AdapterRegistry
from .sampling import SamplingParams


def create_app(*args, **kwargs):
    """See `lorakit.serve.api.create_app` (imported on use: it needs FastAPI)."""
    from .api import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = [
    "AdapterError",
    "AdapterRegistry",
    "BadRequest",
    "Engine",
    "EngineStats",
    "GenerationRequest",
    "NotFound",
    "SamplingParams",
    "ServeError",
    "Unauthorized",
    "Update",
    "create_app",
]
