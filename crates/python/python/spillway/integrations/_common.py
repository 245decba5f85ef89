"""What the integrations share: checking the offloader's options where they are given
(a misspelt option should fail when the trainer is set up, not at its first step), making
the :class:`~spillway.torch.Offloader` once the model is on its device, and saying after
its first step when the model's layers went unseen."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Dict, Optional

import torch

from .._engine import SETTINGS, Engine
from ..torch import Offloader

# Offloader arguments an integration sets itself.
_RESERVED = ("model", "path")


def _offloader_arguments() -> set:
    params = inspect.signature(Offloader.__init__).parameters.values()
    return {
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("self",) + _RESERVED
    }


def check_options(where: str, options: Dict[str, Any], path_argument: str = "path") -> None:
    """Raises TypeError for an option the Offloader does not take, and ValueError (as the
    engine would) for a bad engine setting, without opening anything. ``path_argument``:
    where the integration takes the path instead."""
    if "model" in options:
        raise TypeError(f"{where}: model= is set by the integration (the model the trainer trains)")
    if "path" in options:
        raise TypeError(f"{where}: the path is not an option here: give it as {path_argument}=")
    own = _offloader_arguments()
    unknown = sorted(n for n in options if n not in own and n not in SETTINGS)
    if unknown:
        raise TypeError(
            f"{where}: unknown option(s) {', '.join(unknown)}: expected arguments of "
            f"spillway.torch.Offloader ({', '.join(sorted(own))}) or engine settings (spillway.SETTINGS)"
        )
    settings = {n: v for n, v in options.items() if n in SETTINGS and n not in own}
    if settings:
        Engine.resolve_settings(**settings)


def checkpointing(model: torch.nn.Module) -> bool:
    """Whether a module of ``model`` recomputes itself in backward (Hugging Face's
    activation checkpointing sets ``gradient_checkpointing = True`` on each such layer)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def make_offloader(model: torch.nn.Module, path: Optional[str], options: Dict[str, Any]) -> Offloader:
    """The offloader for ``model``. When the model already recomputes its layers
    (activation checkpointing), the planner is told not to add recomputation of its own
    (a block would be recomputed twice), unless ``recompute=`` was given."""
    opts = dict(options)
    if "recompute" not in opts and checkpointing(model):
        opts["recompute"] = False
    return Offloader(model, path, **opts)


def check_first_step(off: Offloader, model: torch.nn.Module) -> None:
    """After the offloader's first step: warns when the model checkpoints its layers but
    the step was not cut at any of them (one segment): the layers' forward calls were not
    seen (a checkpoint wrapper that hides the layers' hooks)."""
    last = off.stats()["last_step"]
    if last.get("segments", 0) <= 1 and checkpointing(model):
        warnings.warn(
            "spillway: the model checkpoints its layers, but the offloader saw none of their forward calls (the "
            "step is one segment): it cannot tell the layers apart, so policy='all' offloads nothing after the "
            "first step and the adaptive planner sees the model as one segment. Checkpoint the layers so that "
            "their forward hooks run (torch.utils.checkpoint around the layer's call, e.g. "
            "gradient_checkpointing_kwargs={'use_reentrant': False}).",
            RuntimeWarning,
            stacklevel=3,
        )
