"""What the command-line tools share: bad input ends in one `error: ...` line and exit status 2,
never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from models.data import DataError


class UsageError(Exception):
    """A mistake the user can fix; the message says how."""


def run(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    try:
        main(argv)
    except (UsageError, DataError, KeyError, FileNotFoundError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print("error: " + " ".join(str(message).split()), file=sys.stderr)  # one line, always
        sys.exit(2)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state_dict file (safely: weights_only) into `model`, or say why it does not fit."""
    if not path.is_file():
        raise UsageError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path} is not a PyTorch state_dict file ({reason})") from e
    if not isinstance(state, dict):
        raise UsageError(f"{path} holds a {type(state).__name__}, expected a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[:3]
        raise UsageError(f"{path} does not fit this architecture: {' '.join(first)}") from e
