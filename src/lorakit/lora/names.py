"""The name an adapter gets from its directory, when the caller gives none.

One rule for `lorakit generate`, `lorakit serve` and `PeftModel.from_pretrained`, so the same
folder is called the same thing everywhere.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Sequence

from .routing import BASE

RUN_ADAPTER_FOLDER = "adapter"  # what `lorakit train` writes inside its run dir
MAX_STEM = 100  # stays within the server's 128-character limit once numbered


def adapter_name_for(path: str | os.PathLike, taken: Collection[str] = ()) -> str:
    """The folder's name made safe (letters, digits, `_ . -`), numbered past `taken` and BASE.

    A run's `adapter/` folder is named by the run (`runs/a/adapter` -> "a"); symlinks are not
    followed, so a name is what the user typed.
    """
    folder = os.path.abspath(os.fspath(path))
    if os.path.basename(folder) == RUN_ADAPTER_FOLDER and os.path.basename(os.path.dirname(folder)):
        folder = os.path.dirname(folder)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.basename(folder)).strip("-._")[:MAX_STEM]
    stem = stem or RUN_ADAPTER_FOLDER
    name, i = stem, 2
    while name in taken or name == BASE:
        name, i = f"{stem}-{i}", i + 1
    return name


def adapter_names_for(paths: Sequence[str | os.PathLike], taken: Collection[str] = ()) -> list[str]:
    """`adapter_name_for` of each path, each also distinct from the names before it."""
    names: list[str] = []
    for path in paths:
        names.append(adapter_name_for(path, {*taken, *names}))
    return names
