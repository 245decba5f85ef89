"""PyTorch integration: offload the activations a training step saves for backward to
storage during the forward pass, and bring them back, ahead of need, during backward.

    offloader = spillway.torch.Offloader(model, path="/mnt/nvme")
    for x, y in batches:
        with offloader.step():
            loss = loss_fn(model(x), y)
            loss.backward()
        opt.step()

or, for one step, ``with spillway.torch.offload(model, path="/mnt/nvme") as ctx: ...``
(the offloader is kept for the next ``offload`` call with the same model and path).

How it works. Inside ``step()``, every tensor autograd saves passes through
``torch.autograd.graph.saved_tensors_hooks``:

- Tensors that stay in GPU memory: those on another device than the offloader's (CPU
  tensors during GPU training), smaller than ``min_tensor_bytes``, sharing storage with a
  parameter or buffer of the model (weights, their views and transposes), not strided, or
  saved by the last ``keep_last`` segments of the forward pass (needed first by backward).
- Every other tensor is offloaded *by storage*: the whole untyped storage is handed to the
  engine under the key (storage id, version counter), so the views of one storage are
  stored once (the engine deduplicates) and come back as views of one storage, with
  their size, stride and offset. The engine reads the memory once the producing stream
  reaches the point of the save (an event), and the offloader keeps the tensor alive
  until the engine has finished reading it; then its memory goes back to torch's caching
  allocator. In steps that offload, the host stays at most ``run_ahead`` saves ahead of
  the GPU, so that this memory comes back before the host allocates the rest of forward.
- Copy-back (:mod:`.ahead`): the forward pass is cut into *segments* at the forward calls
  of the model's repeated blocks (the children of its largest ``ModuleList``/
  ``Sequential``, or the model's own children). In backward a thread copies the offloaded
  tensors back, last saved first, at most ``fetch_ahead_bytes`` ahead of use and no
  further than ``prefetch_segments`` segments back, into memory from the caching allocator
  on a side stream marked as used by the consuming stream (``record_stream``); the
  consuming stream waits for a copy (an event) when it uses the tensor.
- A tensor modified in place after it was saved is detected through its version counter
  and raises instead of returning stale data. ``retain_graph=True`` works: a copy stays
  on storage until autograd frees the saved tensor.

The *adaptive* policy (the default) measures a step without offloading — the forward and
backward time of every segment, the bytes of every tensor it saves and of its input — with
the engine's write and read bandwidth (the host tier's, when the engine has one) measured
when the offloader starts. The planner (:func:`plan_rok`, see :mod:`.planner`) then chooses
per tensor whether to offload it and per block whether to recompute it, for the goal given:
no goal (the most memory freed with the I/O hidden behind compute), ``budget=`` (saved
activation bytes held up to backward's start under a number of bytes, at the least extra
time) or ``max_slowdown=`` (the most
memory freed within a step-time ratio). A later step that stalls plans again with lower
bandwidths. ``policy="all"`` offloads every segment but the last ``keep_last`` from the
first step. The choice, its predicted memory and time and its reason are in
``stats()["policy"]``.

Beyond eager PyTorch on one device (docs/integrations-compile-fsdp.md):

- ``torch.compile``: the hooks are never traced, and the hook on each block is a graph
  break, so a compiled model runs one graph per block, which saves its activations when it
  ends: they are offloaded block by block as in eager mode. A model compiled before the
  offloader added its hooks never calls them, and is refused at its first step.
- CUDA graphs (capture, ``mode="reduce-overhead"``) replay fixed addresses that offloading
  would give away: refused with :class:`CudaGraphError`.
- FSDP2 and tensor parallelism: parameters, FSDP2's unsharded ones included, stay in
  memory (known by storage object, noted as each block's forward begins); a DTensor is
  offloaded by its local shard and rebuilt with its spec.
"""

from .compat import CudaGraphError
from .offloader import Offloader, offload
from .planner import Profile, RokPlan, SegmentProfile, Tiers, brute_force, simulate
from .planner import plan as plan_rok
from .saved import InPlaceModificationError

__all__ = [
    "Offloader",
    "offload",
    "plan_rok",
    "simulate",
    "brute_force",
    "Profile",
    "SegmentProfile",
    "Tiers",
    "RokPlan",
    "InPlaceModificationError",
    "CudaGraphError",
]
