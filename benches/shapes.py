"""The command line of one benches/train_gpt.py run for a decoder shape, shared by the
drivers that run it many times (rok_grid.py, max_batch.py). Heads are 128 channels wide,
as in the models SSDTrain's grid stands for."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

#: Channels per attention head.
HEAD_DIM = 128


def train_gpt_command(*, arch, layers, d_model, seq, batch, steps, warmup, runs, host_tier, out):
    """The argv running benches/train_gpt.py for one shape, writing its JSON to `out`."""
    return [sys.executable, os.path.join(HERE, "train_gpt.py"), "--arch", arch,
            "--layers", str(layers), "--d-model", str(d_model), "--heads", str(d_model // HEAD_DIM),
            "--seq", str(seq), "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup),
            "--runs", runs, "--host-tier", host_tier, "--out", out]
