"""The machine's one-thread training speed: the yardstick every timing is reported beside.

Machines differ several-fold in what one core does (AVX-512 or not, clock, memory), so a time
to target means little without it. This trains the given model (default ``cnn`` on mnist10k,
batch 32) with one intra-op thread for a few seconds after a warm-up and returns samples/s.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import rules

WARMUP_STEPS = 20


def one_thread_samples_per_second(model: str = "cnn", dataset: str = "mnist10k",
                                  batch_size: int = 32, seconds: float = 3.0,
                                  data_dir: str = "datasets") -> float:
    """Samples/s of plain SGD steps on one CPU thread (forward, backward, update)."""
    from .data import load_split
    from .flat import flatten_
    from .models import build_model, model_input_size

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probe = load_split(dataset, data_dir, train=True, device="cpu")
        data = load_split(dataset, data_dir, train=True, device="cpu",
                          image_size=model_input_size(model, probe.info.image_size))
        torch.manual_seed(0)
        state = flatten_(build_model(model, data.info), "cpu")
        state.module.train()
        gen = torch.Generator().manual_seed(0)
        steps, start = 0, None
        while True:
            for x, y in data.batches(batch_size, generator=gen):
                state.grad.zero_()
                F.cross_entropy(state.module(x), y).backward()
                rules.local_step_(state.flat, state.grad, 0.01)
                steps += 1
                if start is None:
                    if steps == WARMUP_STEPS:
                        start, steps = time.perf_counter(), 0
                elif time.perf_counter() - start >= seconds:
                    return steps * batch_size / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
