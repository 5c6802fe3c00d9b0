"""Run under `accelerate launch` by tests/test_sae_train.py: train one SAE on planted activations, save it to argv[1].

With activations given, every process reads its slice of the same global batch (`TensorSource`), so N processes
and one process see the same tokens at every step; the test compares their SAEs.
"""

import sys

import torch

from steer.train import TrainConfig, train_sae
from tests.test_sae_train import planted

if __name__ == "__main__":
    torch.set_num_threads(1)
    x, _ = planted(n=20_000)
    config = TrainConfig(width=96, k=3, tokens=40_960, batch_size=1024, lr=3e-3, dead_tokens=8192,
                         stats_tokens=4096, checkpoint_every=10_000, device="cpu", seed=0)
    train_sae(config, sys.argv[1], activations=x, progress=False)
