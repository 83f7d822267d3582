"""DMD and SiD losses and their gradients equal the formulas on fixed tensors (float64)."""

import pytest
import torch

from model.dmd import dmd_loss
from model.schedule import FlowSchedule
from model.sid import sid_loss


def fixed(seed=0, shape=(2, 4, 3, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("masked", [False, True])
def test_dmd_loss_and_gradient(masked):
    x, real, fake = fixed()
    x.requires_grad_(True)
    mask = torch.tensor([False, True, True, False]) if masked else None
    loss, _ = dmd_loss(x, real, fake, mask)
    loss.backward()
    norm = (x.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    g = (fake - real) / norm
    keep = mask if masked else torch.ones(4, dtype=torch.bool)
    count = x[:, keep].numel()
    expected_loss = 0.5 * (g[:, keep] ** 2).sum() / count  # ||x - (x - g)||^2 / N / 2
    expected_grad = torch.zeros_like(x)
    expected_grad[:, keep] = g[:, keep] / count
    assert abs(loss.item() - expected_loss.item()) <= 1e-10 * expected_loss.item()
    assert (x.grad - expected_grad).abs().max().item() <= 1e-10 * expected_grad.abs().max().item()


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_sid_loss_and_gradient(alpha):
    x, real, fake = fixed(1)
    x.requires_grad_(True)
    loss = sid_loss(x, real, fake, alpha)
    loss.backward()
    norm = (x.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    expected = ((real - fake) * ((real - x.detach()) - alpha * (real - fake)) / norm).mean()
    assert abs(loss.item() - expected.item()) <= 1e-10 * abs(expected.item())
    expected_grad = -(real - fake) / norm / x.numel()  # predictions held fixed, normalizer stopped
    assert (x.grad - expected_grad).abs().max().item() <= 1e-10 * expected_grad.abs().max().item()


def test_sid_gradient_flows_through_the_scores():
    x, real, fake = fixed(2)
    w = torch.randn_like(x)
    x.requires_grad_(True)
    sid_loss(x, real + w * x, fake, 1.0).backward()  # a "score" that depends on x
    held = x.grad.clone()
    x.grad = None
    sid_loss(x, (real + w * x).detach(), fake, 1.0).backward()
    assert (held - x.grad).abs().max() > 1e-6


def test_step_list_warp_matches_reference():
    warped = FlowSchedule(5.0).denoising_steps([1000, 750, 500, 250], warp=True)
    assert warped == pytest.approx([1000.0, 937.5, 833.3333333, 625.0], abs=1e-6)
    assert FlowSchedule(5.0).unwarped_index(937.5) == 750
    with pytest.raises(ValueError, match="strictly decreasing"):
        FlowSchedule(5.0).denoising_steps([500, 750], warp=True)
