"""spillway: move activation tensors between GPU memory and NVMe storage during training.

The package holds the offload engine (:class:`Engine`, a Rust extension) and the PyTorch
integration (:mod:`spillway.torch`, imported on demand so that the engine works without
torch installed)::

    import spillway.torch
    offloader = spillway.torch.Offloader(model, path="/mnt/nvme")
    for x, y in batches:
        with offloader.step():
            loss = loss_fn(model(x), y)
            loss.backward()
        opt.step()
        opt.zero_grad()

Settings: :data:`SETTINGS` lists every engine setting with its default and meaning.
"""

from ._native import CorruptDataError, SpillwayError, __version__, init_logging, parse_size
from ._engine import SETTINGS, Engine

__all__ = ["CorruptDataError", "Engine", "SpillwayError", "SETTINGS", "init_logging", "parse_size", "__version__"]
