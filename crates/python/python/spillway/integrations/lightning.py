"""PyTorch Lightning with spillway: a callback that offloads the activations of every
training step to storage.

    trainer = lightning.Trainer(..., callbacks=[SpillwayCallback(path="/mnt/nvme")])

Why these hooks: the offloader's ``step()`` context must enclose a step's forward *and*
backward. Under automatic optimization Lightning runs, for each training batch,
``on_train_batch_start``, then (inside the optimizer's closure) ``training_step``,
``on_before_zero_grad``, ``on_before_backward``, the backward and ``on_after_backward``, then
``on_before_optimizer_step``, the optimizer step and ``on_train_batch_end``. The callback
opens the step in ``on_train_batch_start`` and closes it in ``on_after_backward``, so the
step holds exactly the forward and backward; a batch that runs no backward
(``training_step`` returned None) closes it in ``on_train_batch_end``, and an exception
anywhere in the step closes it in ``on_exception`` (the offloader drops the step's state
and the exception goes on as it was). With gradient accumulation every batch is a step.

What it does: at the first training batch (when the module is on its device) it makes one
:class:`spillway.torch.Offloader` for the ``LightningModule`` (its blocks: the module's
largest ``ModuleList``/``Sequential``; ``segments=`` names others) and keeps it for later
batches and later ``fit`` calls (``callback.offloader``, ``callback.stats()``,
``callback.close()``). If the module already recomputes layers (Hugging Face activation
checkpointing) the planner adds no recomputation of its own unless ``recompute=`` is given.

What it refuses, each with the reason in the error:

- manual optimization (``automatic_optimization = False``): ``training_step`` then runs
  its own backward — often several, one per optimizer — which one callback step cannot
  enclose one by one; use the offloader in ``training_step`` instead
  (``with self.offloader.step(): loss = ...; self.manual_backward(loss)``);
- the DeepSpeed and FSDP (version 1) strategies, which gather sharded parameters into
  buffers of their own during forward that the offloader does not see as parameters
  (FSDP2, ``ModelParallelStrategy``, is let through: the offloader knows its unsharded
  parameters);
- unknown options, when the callback is made.

Works with ``lightning`` (``import lightning``, preferred) and with the older
``pytorch_lightning`` package: the callback is a subclass of the ``Callback`` class of each
one installed, so either's ``Trainer`` takes it.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

_bases: List[type] = []
try:
    from lightning.pytorch import Callback as _LightningCallback

    _bases.append(_LightningCallback)
except ImportError:  # pragma: no cover - depends on the environment
    pass
try:
    from pytorch_lightning import Callback as _PLCallback

    if _PLCallback not in _bases:
        _bases.append(_PLCallback)
except ImportError:  # pragma: no cover - depends on the environment
    pass
if not _bases:  # pragma: no cover - depends on the environment
    raise ImportError(
        "spillway.integrations.lightning needs PyTorch Lightning (the lightning or pytorch_lightning package) and "
        "torch: pip install 'spillway[lightning]'"
    )

from ..torch import Offloader  # noqa: E402
from ._common import check_first_step, check_options, make_offloader  # noqa: E402

__all__ = ["ManualOptimizationError", "SpillwayCallback"]

_log = logging.getLogger("spillway.integrations")


class ManualOptimizationError(RuntimeError):
    """SpillwayCallback was used with a module that optimizes manually."""


class SpillwayCallback(*_bases):  # type: ignore[misc]
    """Offloads the activations of each training step (forward and backward) through one
    :class:`spillway.torch.Offloader`.

    Args:
        path: the directory, file or block device for the offloaded bytes (see the
            Offloader's ``path``).
        **offloader_options: :class:`spillway.torch.Offloader` arguments (``policy``,
            ``budget``, ``max_slowdown``, ``min_tensor_bytes``…) and engine settings
            (``spillway.SETTINGS``).
    """

    def __init__(self, path: Optional[str] = None, **offloader_options: Any):
        super().__init__()
        check_options("SpillwayCallback", offloader_options)
        self.path = path
        self.options: Dict[str, Any] = dict(offloader_options)
        self.offloader: Optional[Offloader] = None
        self._step: Any = None  # the open offloader.step() context
        self._checked = False  # the offloader's first step has been looked at

    # -- the public surface ---------------------------------------------------------------

    @property
    def in_step(self) -> bool:
        """Whether a training step is open (from a batch's start to the end of its backward)."""
        return self._step is not None

    def stats(self) -> Optional[Dict[str, Any]]:
        """The offloader's :meth:`~spillway.torch.Offloader.stats`; None before the first step."""
        return None if self.offloader is None else self.offloader.stats()

    def close(self) -> None:
        """Closes the offloader (its hooks and engine); a later training batch makes a new one."""
        self._close_step()
        if self.offloader is not None:
            self.offloader.close()
            self.offloader = None

    # -- Lightning's hooks ----------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._refuse_manual(pl_module)
        self._refuse_sharding(trainer)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._refuse_manual(pl_module)
        # A step left open (a batch stopped between its start and its backward without an
        # exception, e.g. the module's on_train_batch_start returned -1) ends here.
        self._close_step()
        off = self._offloader_for(pl_module)
        step = off.step()
        step.__enter__()
        self._step = step

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        self._close_step(after_backward=True)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._close_step()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._close_step()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close_step(exception)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close_step()

    # -- inside ---------------------------------------------------------------------------

    def _refuse_manual(self, pl_module: Any) -> None:
        if not getattr(pl_module, "automatic_optimization", True):
            raise ManualOptimizationError(
                f"SpillwayCallback needs automatic optimization, but {type(pl_module).__name__} sets "
                "automatic_optimization = False: its training_step runs its own backward (often several, one per "
                "optimizer), which the callback cannot enclose one by one. Remove the callback and use "
                "spillway.torch.Offloader in training_step: with self.offloader.step(): loss = ...; "
                "self.manual_backward(loss)"
            )

    def _refuse_sharding(self, trainer: Any) -> None:
        names = {c.__name__ for c in type(getattr(trainer, "strategy", None)).__mro__}
        for name, what in (("DeepSpeedStrategy", "DeepSpeed"), ("FSDPStrategy", "FSDP (version 1)")):
            if name in names:
                raise ValueError(
                    f"SpillwayCallback: the {what} strategy is not supported: it gathers sharded parameters into "
                    "buffers of its own during forward, which the offloader does not see as parameters: it would "
                    "write them to storage as activations. FSDP2 (ModelParallelStrategy, fully_shard) is let "
                    "through: the offloader knows its unsharded parameters"
                )

    def _offloader_for(self, pl_module: Any) -> Offloader:
        off = self.offloader
        if off is not None and off.model is pl_module:
            return off
        if off is not None:
            off.close()  # another module is trained now
        self.offloader = make_offloader(pl_module, self.path, self.options)
        self._checked = False
        return self.offloader

    def _close_step(self, exception: Optional[BaseException] = None, after_backward: bool = False) -> None:
        step, self._step = self._step, None
        if step is None:
            return
        if exception is None:
            step.__exit__(None, None, None)
            off = self.offloader
            if after_backward and off is not None and not self._checked:
                self._checked = True
                check_first_step(off, off.model)
            return
        try:
            step.__exit__(type(exception), exception, exception.__traceback__)
        except BaseException as e:  # noqa: BLE001 - the exception that stopped training is the one to see
            if e is not exception:
                _log.warning("spillway: closing the step after %r failed too: %r", exception, e)
