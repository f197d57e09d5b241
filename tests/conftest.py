"""Shared fixtures: tiny random-weight models built offline after a fixed seed."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_config():
    from layerdiff.config import get_preset

    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_model():
    """The `tiny` built-in: random weights, seed 0 (shared; tests must not modify it)."""
    from layerdiff.io.checkpoint import load_model

    return load_model("tiny")


@pytest.fixture()
def trained_like_tiny_model(tiny_config):
    """A tiny model whose zero-initialised paths are randomised, so layers really interact."""
    from layerdiff.io.checkpoint import build_random_model

    model = build_random_model(tiny_config, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if any(k in name for k in ("inter_layer_attn.to_out", "intra_layer_attn.gate", "prompt_enhancer.proj_out")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if name.startswith("unet.conv_in.weight") or name.startswith("unet.conv_out"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (fuzz suites: many tiny runs, no thread start-up per case)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
