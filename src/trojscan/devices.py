"""Where work runs: the one check of a ``--device`` option, shared by every command."""

from __future__ import annotations


def check_device(device: str) -> str:
    """``device`` if torch can use it here, else an :class:`~trojscan.errors.InputError`."""
    import torch

    from trojscan.errors import InputError

    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"unknown device {device!r}; use cpu or cuda[:N]") from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but torch sees no CUDA GPU here")
    if parsed.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {device!r}; use cpu or cuda[:N]")
    return device
