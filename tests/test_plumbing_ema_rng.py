"""EMA against its formula, its state round trip and state-dict keys; RNG replay and derivation."""

import io
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from utils.ema import EMA
from utils.rng import get_rng_state, seed_everything, set_rng_state, shared_generator, step_generator


def set_weights(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_ema_follows_formula_and_start_step():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, start_step=2)
    set_weights(model, 0.0)
    initial = {k: v.clone() for k, v in ema.shadow.items()}
    for step in (0, 1):  # before start_step: nothing happens
        set_weights(model, 100.0 + step)
        ema.update(model, step)
        assert not ema.active and ema.step == -1
        assert all(torch.equal(ema.shadow[k], initial[k]) for k in initial)
    # step 2 copies 2.0; then e = 0.9 e + 0.1 p: step 3 -> 0.9*2 + 0.1*3 = 2.1, step 4 -> 0.9*2.1 + 0.1*4 = 2.29
    for step, expected in ((2, 2.0), (3, 2.1), (4, 2.29)):
        set_weights(model, float(step))
        ema.update(model, step)
        assert ema.active and ema.step == step
        for t in ema.shadow.values():
            torch.testing.assert_close(t, torch.full_like(t, expected), rtol=0, atol=1e-6)


def test_ema_keeps_fp32_copies_of_bf16_weights():
    model = nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(model, decay=0.9, start_step=0)
    set_weights(model, 1.0)
    ema.update(model, 0)
    expected = 1.0
    set_weights(model, 2.0)
    for step in range(1, 6):
        ema.update(model, step)
        expected = 0.9 * expected + 0.1 * 2.0
    # 1.40951: a bf16 shadow would be off by ~4e-3 (its spacing near 1.4 is 2**-7)
    for t in ema.shadow.values():
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, torch.full_like(t, expected), rtol=0, atol=1e-6)
    target = nn.Linear(4, 4).to(torch.bfloat16)
    ema.copy_to(target)
    assert torch.equal(target.weight, torch.full((4, 4), expected, dtype=torch.bfloat16))


def test_ema_state_round_trip():
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 1))
    ema = EMA(model, decay=0.99, start_step=1)
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model, step)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)  # must be plain enough for weights_only loading
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    fresh = EMA(nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 1)), decay=0.99, start_step=1)
    assert not fresh.active
    fresh.load_state_dict(state)
    assert fresh.step == 3 and fresh.active
    assert fresh.shadow.keys() == ema.shadow.keys()
    assert all(torch.equal(fresh.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(KeyError, match="missing"):
        EMA(nn.Linear(3, 5), decay=0.99).load_state_dict(state)


def test_ema_keys_are_state_dict_names_under_checkpoint_wrapper():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    model[0] = checkpoint_wrapper(model[0])
    raw = [n for n, _ in model.named_parameters()]
    assert "0._checkpoint_wrapped_module.weight" in raw  # the prefix the EMA must strip
    ema = EMA(model, decay=0.5)
    assert list(ema.shadow) == list(model.state_dict())
    ema.update(model, 0)
    plain = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    plain.load_state_dict(ema.full_state_dict())
    assert torch.equal(plain[0].weight, model[0]._checkpoint_wrapped_module.weight)


def draws():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3), torch.randn(2)


def test_rng_state_replays_draws():
    seed_everything(3, 0)
    draws()
    buffer = io.BytesIO()
    torch.save(get_rng_state(), buffer)
    first = draws()
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    again = draws()
    assert first[0] == again[0] and first[1] == again[1]
    assert torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])
    # ... and the draws really are random (not a constant state)
    assert draws()[0] != first[0]


def test_seeds_differ_across_ranks_and_repeat():
    seed_everything(3, 0)
    rank0 = draws()
    seed_everything(3, 1)
    rank1 = draws()
    seed_everything(3, 0)
    assert draws()[0] == rank0[0] and rank1[0] != rank0[0]
    assert not torch.equal(rank0[2], rank1[2])


def test_step_generators():
    def sample(gen):
        return torch.randn(8, generator=gen)

    base = sample(step_generator(11, 0, 5))
    assert torch.equal(base, sample(step_generator(11, 0, 5)))
    for other in (step_generator(11, 1, 5), step_generator(11, 0, 6), step_generator(12, 0, 5)):
        assert not torch.equal(base, sample(other))
    shared = sample(shared_generator(11, 5))
    assert torch.equal(shared, sample(shared_generator(11, 5)))
    assert not torch.equal(shared, sample(shared_generator(11, 6)))
    assert not torch.equal(shared, base)  # shared and per-rank streams are separate domains
    with pytest.raises(ValueError, match="non-negative"):
        step_generator(-1, 0, 0)


@pytest.mark.gpu
def test_rng_state_replays_cuda_draws():
    seed_everything(3, 0)
    state = get_rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    first = torch.randn(4, device="cuda")
    set_rng_state(state)
    assert torch.equal(first, torch.randn(4, device="cuda"))
    seed_everything(3, 1)
    assert not torch.equal(first, torch.randn(4, device="cuda"))
