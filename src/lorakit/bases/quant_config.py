"""QuantConfig: how a model's linear layers are stored in 4 bits (QLoRA's NF4/FP4).

The fields are bitsandbytes' (transformers' BitsAndBytesConfig for 4 bits): `quant_type`
(bnb_4bit_quant_type), `blocksize`, `double_quant` (bnb_4bit_use_double_quant), `compute_dtype`
(bnb_4bit_compute_dtype: None multiplies in the weight's own dtype) and `skip_modules`
(llm_int8_skip_modules: names of linear layers kept dense, besides the output head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import quant4
from .compute import named_dtype

_COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class QuantConfig:
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype | str | None = None
    skip_modules: tuple[str, ...] | list[str] | None = None

    def __post_init__(self) -> None:
        if self.quant_type not in quant4.QUANT_TYPES:
            raise ValueError(f"QuantConfig.quant_type must be 'nf4' or 'fp4', not {self.quant_type!r}")
        if isinstance(self.blocksize, bool) or self.blocksize not in quant4.BLOCKSIZES:
            allowed = ", ".join(map(str, quant4.BLOCKSIZES))
            raise ValueError(f"QuantConfig.blocksize must be one of {allowed}, not {self.blocksize!r}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"QuantConfig.double_quant must be True or False, not {self.double_quant!r}")
        object.__setattr__(self, "compute_dtype", _compute_dtype(self.compute_dtype))
        skip = self.skip_modules
        if skip is not None:
            if isinstance(skip, str) or not all(isinstance(s, str) and s for s in skip):
                raise ValueError(f"QuantConfig.skip_modules must be a list of module names, not {skip!r}")
            object.__setattr__(self, "skip_modules", tuple(skip))

    @classmethod
    def coerce(cls, value: QuantConfig | str) -> QuantConfig:
        """A QuantConfig as given, or the default one for a quant type name ("nf4", "fp4")."""
        if isinstance(value, QuantConfig):
            return value
        if isinstance(value, str):
            return cls(quant_type=value.lower())
        raise ValueError(f"quantization must be a QuantConfig, 'nf4' or 'fp4', not {value!r}")


def _compute_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    try:
        return named_dtype(value, _COMPUTE_DTYPES)
    except LookupError:
        pass
    raise ValueError(f"QuantConfig.compute_dtype must be None, float32, bfloat16 or float16, not {value!r}")
