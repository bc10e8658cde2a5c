"""Optional features live in named extras (`pip install 'bigadapt[nlg-eval]'`); a missing one is a one-line error."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import BigadaptError


class MissingExtraError(BigadaptError):
    """An optional package is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import `module`, or raise MissingExtraError: "<what> needs the [extra] extra: pip install 'bigadapt[extra]'"."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{what} needs {module.split('.')[0]} from the [{extra}] extra: "
                                f"pip install 'bigadapt[{extra}]'") from None
