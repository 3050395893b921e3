"""The model with its adapters switched off, as a separate object: DPO's reference without a copy."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..lora.peft_model import PeftModel


class AdapterDisabled(nn.Module):
    """Runs `handle`'s base model with every adapter off (`handle.disable_adapter()`).

    It holds no weights of its own: the handle is kept as a plain attribute, not a submodule, so
    nothing is counted, moved, wrapped or saved twice. Whatever forward a library puts on it
    (TRL's fused head) runs inside the disabled block, because the switch is in `__call__`;
    attributes (config, base_model, get_output_embeddings) come from the base model.
    """

    def __init__(self, handle: PeftModel) -> None:
        super().__init__()
        self.__dict__["_handle"] = handle
        self.training = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._handle.disable_adapter():
            return super().__call__(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._handle.get_base_model()(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any):
        # the weights it runs (a fingerprint for TRL's cached reference log-probs)
        return self._handle.get_base_model().state_dict(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_handle"].get_base_model(), name)
