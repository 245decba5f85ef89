"""spillway.integrations: Hugging Face transformers (a plain loop, ``Trainer`` through
``wrap`` and ``SpillwayTrainer``) and PyTorch Lightning (``SpillwayCallback``), each run
against the same run without spillway.

Losses and gradients (or, where the framework consumes the gradients, the parameters after
a few optimizer steps) must be bitwise equal to the baseline's, and the offloader must have
offloaded tensors and fetched them back: ``policy="all"`` and a small ``min_tensor_bytes``
make it offload at these sizes. Small models on CPU tensors (the host engine), so that each test takes
seconds on two cores."""

import os
import tempfile
import warnings

import pytest

# The test command sets SPILLWAY_REQUIRE_TORCH=1: there, a missing framework is a failure,
# not a skip.
REQUIRE = bool(os.environ.get("SPILLWAY_REQUIRE_TORCH"))


def _require(name):
    """The module ``name``: imported (SPILLWAY_REQUIRE_TORCH set), else skipped without it."""
    return __import__(name, fromlist=["_"]) if REQUIRE else pytest.importorskip(name)


torch = _require("torch")
import spillway.integrations  # noqa: E402
import spillway.torch as st  # noqa: E402

torch.use_deterministic_algorithms(True)

# As in test_torch.py: a small engine, so that packing, staging and prefetch all happen.
SETTINGS = dict(staging_bytes="16MiB", prefetch_bytes="8MiB", pack_extent_bytes="2MiB", pack_threshold="1MiB",
                spread_files=1)
OPTIONS = dict(policy="all", min_tensor_bytes=16 << 10, keep_last=1, capacity="1GiB", **SETTINGS)


def assert_bitwise_equal(a, b, what="gradient"):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{what} {i} differs (max abs diff {(x - y).abs().max().item()})"


def assert_offloaded(stats):
    # (What the engine wrote, or handed back before writing it: bytes_written or
    # bytes_forwarded, depends on timing.)
    assert stats["offloaded_tensors"] > 0 and stats["bytes_offloaded"] > 0, stats
    assert stats["bytes_fetched"] > 0, stats


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_the_package_imports_without_the_frameworks():
    import subprocess
    import sys

    code = (
        "import sys, spillway.integrations; "
        "bad = [m for m in ('transformers', 'lightning', 'pytorch_lightning', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def hf():
    _require("transformers")
    import spillway.integrations.hf as hf

    return hf


def llama(attn="sdpa", checkpointing=None):
    """A small random Llama (no download). ``checkpointing``: None (off), "non-reentrant"
    or "reentrant" (torch.utils.checkpoint's two kinds)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=128, max_position_embeddings=128, attn_implementation=attn,
    )
    model = LlamaForCausalLM(cfg)
    model.train()
    if checkpointing:
        kwargs = {"use_reentrant": checkpointing == "reentrant"}
        # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias).
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def tokens(n=4, seq=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, seq), generator=g)


def llama_step(model, x, ctx=None):
    model.zero_grad(set_to_none=True)
    with ctx if ctx is not None else _nothing():
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


CHECKPOINTING = [None, "non-reentrant", "reentrant"]


@pytest.mark.parametrize("checkpointing", CHECKPOINTING, ids=["no-ckpt", "ckpt", "ckpt-reentrant"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_in_a_plain_loop_is_bitwise_equal(tmp_path, hf, attn, checkpointing):
    model, x = llama(attn, checkpointing), tokens()
    loss0, g0 = llama_step(model, x)
    layers = model.model.layers
    hooks = [len(layer._forward_pre_hooks) for layer in layers]
    with st.Offloader(model, str(tmp_path), **OPTIONS) as off:
        # The blocks found are the decoder layers.
        assert [len(layer._forward_pre_hooks) for layer in layers] == [n + 1 for n in hooks]
        for _ in range(2):
            loss, g = llama_step(model, x, off.step())
            assert torch.equal(loss, loss0)
            assert_bitwise_equal(g, g0)
        s = off.stats()
    assert_offloaded(s)
    # One segment before the layers, one per layer.
    assert s["last_step"]["segments"] == len(layers) + 1
    assert [len(layer._forward_pre_hooks) for layer in layers] == hooks, "close() removes the hooks"


class CheckpointedAroundCall(torch.nn.Module):
    """Layers checkpointed as transformers 4.x does: ``checkpoint(layer.__call__, ...)``,
    the forward hooks inside, flagged ``gradient_checkpointing = True``."""

    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 128))
            for _ in range(3)
        )
        for layer in self.layers:
            layer.gradient_checkpointing = True

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        for layer in self.layers:
            x = x + checkpoint(layer.__call__, x, use_reentrant=self.reentrant)
        return x.square().mean()


@pytest.mark.parametrize("reentrant", [True, False])
def test_layers_checkpointed_reentrant_or_not_are_segments_and_offload(tmp_path, hf, reentrant):
    torch.manual_seed(0)
    model = CheckpointedAroundCall(reentrant)
    # Reentrant checkpointing needs an input that requires grad (transformers makes the
    # embeddings' output one).
    x = torch.randn(64, 128, requires_grad=True)
    model(x).backward()
    g0 = [p.grad.clone() for p in model.parameters()]
    state = hf.TrainerOffloading(str(tmp_path), OPTIONS)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            with state.step(model):
                model(x).backward()
            assert_bitwise_equal([p.grad for p in model.parameters()], g0)
    ours = [w for w in seen if "spillway" in str(w.message)]
    last = state.stats()["last_step"]
    # Reentrant or not, every layer starts a segment (reentrant checkpointing runs the
    # layers without grad in forward), and the second step offloads: nothing to warn of.
    assert last["segments"] == len(model.layers) + 1 and not ours, (last, [str(w.message) for w in ours])
    assert last["offloaded_bytes"] > 0, last
    state.close()


def train_llama(checkpointing, how=None, path=None, steps=3, options=None):
    """Trains a small Llama for ``steps`` optimizer steps with transformers.Trainer;
    ``how``: None (plain Trainer), "wrap" or "subclass". Returns (model, trainer)."""
    from transformers import Trainer, TrainingArguments

    # Trainer's own switch for checkpointing (args.gradient_checkpointing, or
    # activation_checkpointing in transformers 5) calls the model's method, as llama() does.
    model = llama("sdpa", checkpointing)
    data = [{"input_ids": t, "labels": t} for t in tokens(n=4 * steps, seed=2)]
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-2, seed=0,
            use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0,
        )
        opts = {**OPTIONS, **(options or {})}
        if how == "subclass":
            from spillway.integrations.hf import SpillwayTrainer

            trainer = SpillwayTrainer(model=model, args=args, train_dataset=data, spillway_path=path,
                                      spillway_options=opts)
        else:
            trainer = Trainer(model=model, args=args, train_dataset=data)
            if how == "wrap":
                import spillway.integrations.hf as hf

                assert hf.wrap(trainer, path=path, **opts) is trainer
        trainer.train()
    return model, trainer


_baselines = {}


def trained_baseline(checkpointing):
    if checkpointing not in _baselines:
        model, _ = train_llama(checkpointing)
        _baselines[checkpointing] = params(model)
    return _baselines[checkpointing]


@pytest.mark.parametrize("checkpointing", [None, "non-reentrant"], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("how", ["wrap", "subclass"])
def test_trainer_trains_bitwise_equal(tmp_path, hf, how, checkpointing):
    base = trained_baseline(checkpointing)
    model, trainer = train_llama(checkpointing, how, str(tmp_path))
    assert_bitwise_equal(params(model), base, "parameter")
    assert isinstance(trainer.spillway, hf.TrainerOffloading)
    s = trainer.spillway.stats()
    assert s["steps"] == 3
    assert_offloaded(s)
    assert s["last_step"]["segments"] == len(model.model.layers) + 1
    # A model that recomputes its layers already gets no recomputation from the planner.
    assert trainer.spillway.offloader.allow_recompute is (checkpointing is None)
    trainer.spillway.close()
    assert trainer.spillway.offloader is None


def test_trainer_with_gradient_accumulation_steps_each_micro_batch(tmp_path, hf):
    from transformers import Trainer, TrainingArguments

    def run(wrapped):
        model = llama("sdpa")
        data = [{"input_ids": t, "labels": t} for t in tokens(n=8, seed=3)]
        with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            args = TrainingArguments(
                output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
                learning_rate=1e-2, seed=0, use_cpu=True, report_to="none", save_strategy="no",
                logging_strategy="no", disable_tqdm=True,
            )
            trainer = Trainer(model=model, args=args, train_dataset=data)
            if wrapped:
                hf.wrap(trainer, path=str(tmp_path), **OPTIONS)
            trainer.train()
        return params(model), trainer

    base, _ = run(False)
    got, trainer = run(True)
    assert_bitwise_equal(got, base, "parameter")
    assert trainer.spillway.stats()["steps"] == 4  # two optimizer steps of two micro-batches
    assert_offloaded(trainer.spillway.stats())


def test_hf_refusals(tmp_path, hf):
    from transformers import Trainer, TrainingArguments

    with pytest.raises(TypeError, match=r"expects a transformers\.Trainer"):
        hf.wrap(llama(), path=str(tmp_path))
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = TrainingArguments(output_dir=out, use_cpu=True, report_to="none", max_steps=1)
        trainer = Trainer(model=llama(), args=args, train_dataset=[])
        with pytest.raises(TypeError, match="unknown option.*polcy"):
            hf.wrap(trainer, path=str(tmp_path), polcy="all")
        with pytest.raises(ValueError, match="staging_bytes"):
            hf.wrap(trainer, path=str(tmp_path), staging_bytes="lots")
        with pytest.raises(TypeError, match="model= is set by the integration"):
            hf.wrap(trainer, path=str(tmp_path), model=llama())
        with pytest.raises(TypeError, match="give it as spillway_path="):
            hf.SpillwayTrainer(model=llama(), args=args, train_dataset=[], spillway_options={"path": str(tmp_path)})
        hf.wrap(trainer, path=str(tmp_path))
        with pytest.raises(RuntimeError, match="already"):
            hf.wrap(trainer, path=str(tmp_path))
        sharded = Trainer(model=llama(), args=args, train_dataset=[])
        sharded.is_fsdp_enabled = True
        with pytest.raises(ValueError, match=r"FSDP \(version 1\) training is not supported"):
            hf.wrap(sharded, path=str(tmp_path))


# ------------------------------------------------------------------- Lightning

FLAVOURS = ["lightning.pytorch", "pytorch_lightning"]


def _fail_in_backward(grad):
    raise ValueError("failed in backward")


def lightning_module(pl, manual=False, fail=None):
    """A small residual MLP as a LightningModule of ``pl`` (lightning.pytorch or
    pytorch_lightning). ``fail``: (batch index, "forward" or "backward") to raise at."""

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = not manual
            self.blocks = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 128))
                for _ in range(3)
            )
            self.head = torch.nn.Linear(128, 1)
            self.seen = []  # per batch: whether the step was open in training_step and in backward

        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return self.head(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            x = x.clone().requires_grad_()
            spill = next((c for c in self.trainer.callbacks if hasattr(c, "in_step")), None)
            record = [spill is not None and spill.in_step, None]
            self.seen.append(record)
            # Runs at the very end of backward (x is the first input).
            x.register_hook(lambda g: record.__setitem__(1, spill is not None and spill.in_step))
            if fail == (batch_idx, "forward"):
                raise ValueError("failed in forward")
            loss = torch.nn.functional.mse_loss(self(x), y)
            if fail == (batch_idx, "backward"):
                loss.register_hook(_fail_in_backward)
            if manual:
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    return Net()


def batches(n=6):
    g = torch.Generator().manual_seed(4)
    ds = torch.utils.data.TensorDataset(torch.randn(n * 64, 128, generator=g), torch.randn(n * 64, 1, generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=64)


def fit(pl, module, callbacks=(), steps=3, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **kw,
        )
        trainer.fit(module, batches())
    return trainer


@pytest.fixture(scope="module", params=FLAVOURS, ids=["lightning", "pytorch_lightning"])
def pl(request):
    import logging

    mod = _require(request.param)
    logging.getLogger(request.param.split(".")[0]).setLevel(logging.WARNING)
    return mod


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_callback_trains_bitwise_equal(tmp_path, pl, accumulate):
    from spillway.integrations.lightning import SpillwayCallback

    base = lightning_module(pl)
    fit(pl, base, accumulate_grad_batches=accumulate)
    net = lightning_module(pl)
    cb = SpillwayCallback(path=str(tmp_path), **OPTIONS)
    fit(pl, net, [cb], accumulate_grad_batches=accumulate)
    assert_bitwise_equal(params(net), params(base), "parameter")
    # The step is open in training_step and through the end of backward, closed after.
    assert net.seen == [[True, True]] * (3 * accumulate)
    assert not cb.in_step
    s = cb.stats()
    assert s["steps"] == 3 * accumulate
    assert s["last_step"]["segments"] == len(net.blocks) + 1
    assert_offloaded(s)
    cb.close()


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_lightning_an_exception_in_the_step_closes_it(tmp_path, pl, where):
    from spillway.integrations.lightning import SpillwayCallback

    net = lightning_module(pl, fail=(1, where))
    cb = SpillwayCallback(path=str(tmp_path), **OPTIONS)
    with pytest.raises(ValueError, match=f"failed in {where}"):
        fit(pl, net, [cb])
    assert not cb.in_step
    # The offloader is out of its step: the next one runs, and gives the right gradients.
    x = torch.randn(64, 128)
    net.zero_grad(set_to_none=True)
    net(x).square().mean().backward()
    g0 = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    with cb.offloader.step():
        net(x).square().mean().backward()
    assert_bitwise_equal([p.grad for p in net.parameters()], g0)
    cb.close()


def test_lightning_manual_optimization_is_refused(tmp_path, pl):
    from spillway.integrations.lightning import ManualOptimizationError, SpillwayCallback

    net = lightning_module(pl, manual=True)
    cb = SpillwayCallback(path=str(tmp_path), **OPTIONS)
    with pytest.raises(ManualOptimizationError, match="automatic_optimization = False"):
        fit(pl, net, [cb])
    assert cb.offloader is None and not cb.in_step


def test_lightning_unknown_options_are_refused(tmp_path):
    _require("lightning.pytorch")
    from spillway.integrations.lightning import SpillwayCallback

    with pytest.raises(TypeError, match="unknown option.*keep_lst"):
        SpillwayCallback(path=str(tmp_path), keep_lst=1)


def test_lightning_sharded_strategies_are_refused(tmp_path, pl):
    from spillway.integrations.lightning import SpillwayCallback

    strategies = pl.strategies
    cb = SpillwayCallback(path=str(tmp_path), **OPTIONS)
    net = lightning_module(pl)
    for cls, what in ((strategies.FSDPStrategy, r"FSDP \(version 1\)"), (strategies.DeepSpeedStrategy, "DeepSpeed")):
        trainer = type("T", (), {"strategy": cls.__new__(cls)})()
        with pytest.raises(ValueError, match=f"the {what} strategy is not supported"):
            cb.on_fit_start(trainer, net)

