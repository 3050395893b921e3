"""Turning a `--model` string into a loaded (model, tokenizer) pair."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Union

import torch

from .cache import cache_dir
from .embedded import BUILTIN_MODELS, builtin_gguf_path
from .gguf import converted_gguf_dir
from .tokens import ensure_pad_token

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..bases.quant_config import QuantConfig

DType = Union[None, Literal["auto", "float32", "bfloat16", "float16"], torch.dtype]
Device = Union[None, Literal["auto", "cpu", "cuda", "mps"], str, torch.device]

# "name" or "org/name"; anything else that does not exist locally is a mistyped path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_path(name_or_path: str) -> str:
    """Map a `--model` value to what `from_pretrained` should get.

    Built-in name -> its cached safetensors dir (converted on first use); a local
    directory -> itself; a ``.gguf`` file -> its cached converted dir; a hub id ->
    unchanged (only transformers touches the network, and only if the user has it).
    """
    builtins = ", ".join(BUILTIN_MODELS)
    key = name_or_path.lower()
    if key in BUILTIN_MODELS:
        final = cache_dir() / "models" / key
        return str(converted_gguf_dir(builtin_gguf_path(key), final))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return str(converted_gguf_dir(path))
        raise ValueError(f"{name_or_path}: not a model directory or .gguf file")
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(f"model path not found: {name_or_path}")
    if "/" not in name_or_path and difflib.get_close_matches(key, BUILTIN_MODELS, cutoff=0.7):
        raise ValueError(f"unknown built-in model {name_or_path!r}; built-in models: {builtins}")
    return name_or_path


def _looks_like_path(s: str) -> bool:
    """True for strings a hub id can never be: absolute/relative paths, .gguf names, backslashes."""
    return (
        s.lower().endswith(".gguf")
        or s.startswith(("/", ".", "~"))
        or "\\" in s
        or not _HUB_ID.match(s)
    )


def pick_device(device: Device = None) -> torch.device:
    """`None`/"auto" -> cuda, then mps, then cpu; anything else as given."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def pick_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    """`None`/"auto" -> bfloat16 on a CUDA GPU that supports it, else float32 (CPU, MPS)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    return getattr(torch, dtype)


def packed_gguf_path(name_or_path: str) -> Path:
    """The GGUF file a packed load reads: a built-in model's, or a ``.gguf`` path as given."""
    key = name_or_path.lower()
    if key in BUILTIN_MODELS:
        return builtin_gguf_path(key)
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"packed=True loads a .gguf file or a built-in model ({', '.join(BUILTIN_MODELS)}), "
                         f"not {name_or_path!r}")
    if not path.is_file():
        raise FileNotFoundError(f"model path not found: {name_or_path}")
    return path


# How a GGUF model (a .gguf file or a built-in one) becomes the frozen base a run trains on:
# "packed" keeps the decoder's linear weights in the file's blocks (`models.gguf_packed`), "dense"
# converts them to dense tensors once (the cached conversion); "auto" is packed wherever the packed
# loader reads the file's architecture when PACKED_BY_DEFAULT, else dense. The rule: packed
# is the default if its training step is within 10 % of the dense one (benchmarks/packed_speed.py;
# the figures and the decision are in docs/gguf.md, "Training and running on the GGUF blocks").
PACKED_BY_DEFAULT = True
GGUF_BASES = ("auto", "packed", "dense")


def is_gguf_model(name_or_path: str) -> bool:
    """True for a built-in model or a ``.gguf`` path: the models `gguf_base` applies to."""
    return name_or_path.lower() in BUILTIN_MODELS or Path(name_or_path).suffix.lower() == ".gguf"


def packed_choice(gguf_base: str) -> bool | None:
    """load_model's `packed` for a `gguf_base` value: auto -> None (`packs_gguf`'s rule), packed -> True,
    dense -> False."""
    if gguf_base not in GGUF_BASES:
        raise ValueError(f"gguf_base must be one of {', '.join(GGUF_BASES)}, not {gguf_base!r}")
    return {"auto": None, "packed": True, "dense": False}[gguf_base]


def packs_gguf(name_or_path: str, gguf_base: str = "auto") -> bool:
    """Whether a run with `gguf_base` (one of GGUF_BASES) loads `name_or_path` packed.

    "packed" on a model that is no GGUF, or whose architecture the packed loader does not read,
    raises a ValueError naming it; "auto" then takes the dense conversion."""
    if gguf_base not in GGUF_BASES:
        raise ValueError(f"gguf_base must be one of {', '.join(GGUF_BASES)}, not {gguf_base!r}")
    if gguf_base == "dense" or (gguf_base == "auto" and not (PACKED_BY_DEFAULT and is_gguf_model(name_or_path))):
        return False
    from .gguf_packed import PACKED_ARCHS, packable

    path = packed_gguf_path(name_or_path)  # refuses what is no GGUF
    if packable(path):
        return True
    if gguf_base == "packed":
        raise ValueError(f"gguf_base packed: {path.name}'s architecture is none the packed loader reads "
                         f"({', '.join(PACKED_ARCHS)}); use gguf_base dense")
    return False


def load_model(
    name_or_path: str, *, dtype: DType = None, device: Device = None,
    quantization: QuantConfig | str | None = None, packed: bool | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer (pad token always set) from any `--model` value.

    Returns ``(model, tokenizer)``; the model is in eval mode on `device`.

    A GGUF model (a ``.gguf`` file or a built-in one) keeps the decoder's linear weights in the
    file's GGUF blocks (`models.gguf_packed`) wherever the packed loader reads its architecture
    (`packed=None`, the rule of `packs_gguf`); `packed=False` loads the cached dense conversion
    instead, `packed=True` insists on the blocks (an error where they cannot be kept).

    `quantization` (a QuantConfig, "nf4" or "fp4") stores every linear layer but the output head
    (and `skip_modules`) in 4 bits (lorakit's Linear4bit), streaming the safetensors checkpoint
    (`models.stream.load_streaming`): the model is built on the meta device and each linear
    weight is quantized on `device` as it is read, every other tensor copied in `dtype`, so peak
    memory is the 4-bit model plus about one tensor, never the 16/32-bit model. The result equals
    `from_pretrained(dtype=...)` followed by `quantize_model`, bit for bit. A hub id is fetched
    first (its json and safetensors files); a checkpoint that is not safetensors is refused. A
    directory already saved in 4 bits (a bitsandbytes `quantization_config`, as transformers or
    `save_quantized` write it) loads through `load_quantized` whatever `quantization` says: its
    layers stay as stored and `dtype` does not cast them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..bases.quant_config import QuantConfig
    from .quantized import bnb_4bit_config, load_quantized
    from .stream import load_streaming

    config = None if quantization is None else QuantConfig.coerce(quantization)
    dev = pick_device(device)
    if packed and config is not None:
        raise ValueError("packed=True keeps the GGUF file's own quantized blocks; quantization does not apply to it")
    if packed is None:
        packed = config is None and packs_gguf(name_or_path, "auto")
    if packed:
        from .gguf_packed import load_packed_gguf

        model, tokenizer = load_packed_gguf(packed_gguf_path(name_or_path), dtype=pick_dtype(dtype, dev))
        return model.to(dev).eval(), tokenizer
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(path))
        if Path(path).is_dir() and bnb_4bit_config(path) is not None:
            return load_quantized(path).to(dev).eval(), tokenizer
        if config is not None:
            return load_streaming(_local_checkpoint(path), config, dtype=pick_dtype(dtype, dev), device=dev), tokenizer
        model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype, dev))
    except OSError as e:
        if Path(path).is_dir():
            raise
        builtins = ", ".join(BUILTIN_MODELS)
        raise OSError(
            f"could not load {name_or_path!r} as a hub id (built-in models: {builtins}): {e}"
        ) from e
    return model.to(dev).eval(), tokenizer


def _local_checkpoint(path: str) -> Path:
    """A local directory as is; a hub id's config and safetensors files, fetched (what
    from_pretrained would download), as a local directory."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
