"""Hugging Face ``transformers.Trainer`` with spillway: the activations of every training
step offloaded to storage, in one line.

    trainer = spillway.integrations.hf.wrap(Trainer(model, args, ...), path="/mnt/nvme")
    trainer.train()

or, where the Trainer class is chosen by name, ``SpillwayTrainer`` in its place::

    trainer = SpillwayTrainer(model, args, ..., spillway_path="/mnt/nvme",
                              spillway_options=dict(budget="20GiB"))

Why ``training_step``: the offloader's ``step()`` context must enclose a step's forward
*and* backward, and ``Trainer.training_step`` runs both (``compute_loss``, then
``accelerator.backward``) for one micro-batch; the optimizer step, logging, evaluation
and saving run outside it. With gradient accumulation each micro-batch is a step of its
own.

What it does: at the first training step (when the Trainer has put the model on its
device) it makes one :class:`spillway.torch.Offloader` for ``trainer.model`` (its blocks:
the model's largest ``ModuleList``, ``model.model.layers`` for Llama-style models) and
keeps it for later steps and later ``train()`` calls; a new model (``model_init``) gets a
new one. ``trainer.spillway`` (a :class:`TrainerOffloading`) holds it: ``.offloader``,
``.stats()``, ``.close()``. Activation checkpointing (``gradient_checkpointing=True``)
works with it: tensors saved while backward recomputes a layer stay in memory, and the
planner adds no recomputation of its own (``recompute=False``) unless told otherwise.

What it refuses (with the reason in the error): an object that is not a ``Trainer``, a
Trainer wrapped twice, unknown options, and DeepSpeed or FSDP version 1 training (they
gather sharded parameters into buffers during forward, which the offloader does not see
as parameters and would write to storage). FSDP2 (``fsdp_version=2``) is let through:
the offloader knows its unsharded parameters.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional

try:
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "spillway.integrations.hf needs Hugging Face transformers (and torch): pip install 'spillway[hf]'"
    ) from e

from ..torch import Offloader
from ._common import check_first_step, check_options, make_offloader

__all__ = ["SpillwayTrainer", "TrainerOffloading", "wrap"]


class TrainerOffloading:
    """The offloading of one Trainer: its options, and the :class:`~spillway.torch.Offloader`
    made at the first training step (``offloader``; None before)."""

    def __init__(self, path: Optional[str], options: Dict[str, Any], where: str = "spillway.integrations.hf.wrap",
                 path_argument: str = "path"):
        check_options(where, options, path_argument)
        self.path = path
        self.options = dict(options)
        self.offloader: Optional[Offloader] = None
        self._checked = False  # the offloader's first step has been looked at

    @contextlib.contextmanager
    def step(self, model: Any) -> Iterator[Offloader]:
        """One offloader step around a training step of ``model``."""
        off = self._offloader_for(model)
        with off.step():
            yield off
        if not self._checked:
            self._checked = True
            check_first_step(off, model)

    def _offloader_for(self, model: Any) -> Offloader:
        off = self.offloader
        if off is not None and off.model is model:
            return off
        if off is not None:
            off.close()  # the Trainer trains another model now (model_init)
        self.offloader = make_offloader(model, self.path, self.options)
        self._checked = False
        return self.offloader

    def stats(self) -> Optional[Dict[str, Any]]:
        """The offloader's :meth:`~spillway.torch.Offloader.stats`; None before the first step."""
        return None if self.offloader is None else self.offloader.stats()

    def close(self) -> None:
        """Closes the offloader (its hooks and engine); a later training step makes a new one."""
        if self.offloader is not None:
            self.offloader.close()
            self.offloader = None


def _refuse_unsupported(trainer: Any, where: str) -> None:
    if not isinstance(trainer, Trainer):
        raise TypeError(
            f"{where} expects a transformers.Trainer (or a subclass of it), not {type(trainer).__module__}."
            f"{type(trainer).__qualname__}: it wraps Trainer.training_step, which runs one step's forward and backward"
        )
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise ValueError(
            f"{where}: DeepSpeed training is not supported: ZeRO gathers sharded parameters into buffers of its own "
            "during forward, which the offloader does not see as parameters: it would write them to storage as "
            "activations"
        )
    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
        if getattr(plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                f"{where}: FSDP (version 1) training is not supported: it gathers flat parameters into buffers "
                "during forward, which the offloader does not see as parameters: it would write them to storage as "
                "activations. FSDP2 (fsdp_version=2, fully_shard) is let through: the offloader knows its unsharded "
                "parameters"
            )


def wrap(trainer: Trainer, path: Optional[str] = None, **offloader_options: Any) -> Trainer:
    """Makes ``trainer`` offload the activations of each training step to ``path``.

    ``offloader_options`` are :class:`spillway.torch.Offloader`'s arguments (``policy``,
    ``budget``, ``max_slowdown``, ``min_tensor_bytes``…) and engine settings
    (``spillway.SETTINGS``). The trainer's ``training_step`` is replaced, on this instance
    only, by one that runs the original inside ``offloader.step()``; ``trainer.spillway``
    is the :class:`TrainerOffloading`. Returns the trainer.
    """
    _refuse_unsupported(trainer, "spillway.integrations.hf.wrap")
    if isinstance(getattr(trainer, "spillway", None), TrainerOffloading):
        raise RuntimeError(
            "spillway.integrations.hf.wrap: this Trainer offloads through spillway already "
            "(wrapped before, or a SpillwayTrainer); steps do not nest"
        )
    state = TrainerOffloading(path, offloader_options)
    inner = trainer.training_step  # bound: the class's (or a subclass's) own

    def training_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        with state.step(trainer.model):
            return inner(model, inputs, *args, **kwargs)

    training_step.__doc__ = inner.__doc__
    trainer.training_step = training_step
    trainer.spillway = state
    return trainer


class SpillwayTrainer(Trainer):
    """A ``transformers.Trainer`` whose training steps offload activations through spillway.

    Takes the Trainer's arguments, and:

    Args:
        spillway_path: the directory, file or block device for the offloaded bytes (see
            :class:`spillway.torch.Offloader`'s ``path``).
        spillway_options: :class:`spillway.torch.Offloader` arguments and engine settings.

    ``self.spillway`` is the :class:`TrainerOffloading` (``.offloader``, ``.stats()``).
    """

    def __init__(
        self,
        *args: Any,
        spillway_path: Optional[str] = None,
        spillway_options: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
    ):
        self.spillway = TrainerOffloading(
            spillway_path, dict(spillway_options or {}), "SpillwayTrainer: spillway_options", "spillway_path"
        )
        super().__init__(*args, **kwargs)
        _refuse_unsupported(self, "SpillwayTrainer")

    def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.training_step`` (forward, loss, backward of one micro-batch) inside one
        offloader step."""
        with self.spillway.step(self.model):
            return super().training_step(model, inputs, *args, **kwargs)
