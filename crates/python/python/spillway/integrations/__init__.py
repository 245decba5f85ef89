"""Ways into :class:`spillway.torch.Offloader` from training frameworks, so that a
project that trains with one of them adds spillway with one line instead of rewriting its
training loop.

The offloader works around one training step's forward *and* backward
(``with offloader.step(): ...``). A framework runs both itself, so each integration puts
that context where the framework's step encloses them:

- :mod:`spillway.integrations.hf` — Hugging Face ``transformers.Trainer``:
  ``spillway.integrations.hf.wrap(trainer, path="/mnt/nvme")``, or
  ``SpillwayTrainer(..., spillway_path="/mnt/nvme")`` in place of ``Trainer``. Each call
  of ``Trainer.training_step`` (forward, loss and ``accelerator.backward``) runs inside
  one offloader step. See docs/integrations-hf.md.
- :mod:`spillway.integrations.lightning` — PyTorch Lightning:
  ``Trainer(callbacks=[SpillwayCallback(path="/mnt/nvme")])``. The step opens when a
  training batch starts and closes after its backward (automatic optimization). See
  docs/integrations-lightning.md.

The frameworks are optional dependencies (the ``hf`` and ``lightning`` extras of the
package): this package imports neither; importing a submodule without its framework
raises an ImportError that names the extra to install.
"""

__all__ = ["hf", "lightning"]
