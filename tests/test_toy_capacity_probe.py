"""scripts/toy_capacity_probe.py: its oracle loss on fixed clips, and a tiny run that learns."""

import torch

from model.toy.world import ToyWorld
from scripts import toy_capacity_probe
from train_setup import TINY


def test_oracle_loss_is_the_mse_to_the_nearest_own_prompt_template():
    world = ToyWorld(height=8, width=8, num_frames=4, radius=1.5, lanes=2, phases=1)
    prompts = ["a red circle moving left", "a blue square moving up"]
    own = [world.templates(p, 4) for p in prompts]            # [K, F, C, H, W] each
    offsets = torch.tensor([0.05, -0.2])
    video = torch.stack([own[0][1] + offsets[0], own[1][0] + offsets[1]])
    # each clip is its template plus a constant, so the nearest own template is that one
    assert torch.isclose(toy_capacity_probe.oracle_loss(video, prompts, world), (offsets ** 2).mean(), rtol=1e-6)
    # another prompt's template is never the target: a clip equal to a green circle still pays its distance
    green = world.templates("a green circle moving left", 4)[1]
    loss = toy_capacity_probe.oracle_loss(green[None], prompts[:1], world)
    expected = min(((green - t) ** 2).mean() for t in own[0])
    assert torch.isclose(loss, expected, rtol=1e-6) and loss > 0.1
    # the mask keeps only the named frames
    masked = toy_capacity_probe.oracle_loss(video, prompts, world, torch.tensor([True, False, False, False]))
    assert torch.isclose(masked, (offsets ** 2).mean(), rtol=1e-6)


def test_probe_trains_the_generator_towards_the_templates(capsys):
    overrides = [o for o in TINY if not o.startswith(("checkpoint.", "eval."))]
    result = toy_capacity_probe.main(["--steps", "30", "--eval-every", "30", "--lr", "3e-3", *overrides])
    first, last = result["history"][0], result["history"][-1]
    assert [h["step"] for h in result["history"]] == [0, 30]
    assert last["mean_distance"] < 0.8 * first["mean_distance"], result["history"]
    assert "mean distance" in capsys.readouterr().out
