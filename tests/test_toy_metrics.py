"""Toy metrics against hand-computed values, the Euler sampler, metrics.jsonl and video files."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from model.toy import ToyWorld
from pipeline.ode import euler_sample, sigma_grid
from utils.toy_metrics import (append_jsonl, coverage, distance, evaluate,
                               frame_error, frame_rmse, match_radii, match_rate, pairwise_distance)
from utils.video import grid_video, to_uint8, write_video

A, B = "a red circle moving left", "a blue square moving up"


@pytest.fixture(scope="module")
def world():
    return ToyWorld()


def offset(clip: torch.Tensor, per_frame: list[float]) -> torch.Tensor:
    """Add a constant per frame: the frame's RMSE to the original is exactly |constant|."""
    return clip + torch.tensor(per_frame)[:, None, None, None]


def test_distance_definitions():
    a = torch.zeros(2, 3, 3, 4, 4)
    b = offset(a[0], [0.1, -0.2, 0.3])
    assert torch.allclose(frame_rmse(a[0], b), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    assert torch.isclose(distance(a[0], b), torch.tensor(0.2, dtype=torch.float64))
    c = torch.randn(4, 3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    d = pairwise_distance(c[:2], c)
    assert torch.allclose(d, distance(c[:2, None], c[None]), atol=1e-6)
    assert d[0, 0] < 1e-6 and d[1, 1] < 1e-6


def test_match_rate_and_coverage_on_hand_made_samples(world):
    ta, tb = world.templates(A), world.templates(B)
    f = world.num_frames
    samples = torch.stack([
        ta[0],                                   # exact: matches, covers A's template 0
        offset(ta[0], [0.05] * f),               # 0.05 away: matches, template 0 again
        offset(ta[1], [0.01 * i for i in range(f)]),   # 0.055 away: matches, covers template 1
        tb[2],                                   # B's template under A's prompt: no match
        offset(tb[3], [0.15] * f),               # 0.15 > threshold 0.1: nearest is B's, no match
        offset(tb[3], [-0.08] * f),              # 0.08: matches, covers B's template 3
    ])
    prompts = [A, A, A, A, B, B]
    assert match_rate(samples, prompts, world, threshold=0.1) == pytest.approx(4 / 6)
    assert match_rate(samples, prompts, world, threshold=0.2) == pytest.approx(5 / 6)
    mean, per_prompt = coverage(samples, prompts, world, threshold=0.1)
    k = world.templates_per_prompt
    assert per_prompt == {A: pytest.approx(2 / k), B: pytest.approx(1 / k)}
    assert mean == pytest.approx((2 / k + 1 / k) / 2)


def test_match_radius_is_the_one_pixel_move_of_the_nearest_template(world):
    ta = world.templates(A)
    k, p = world.templates_per_prompt, world.prompt_index(A)
    radius = match_radii(world, world.num_frames, 1.0)[p * k:(p + 1) * k]
    f = world.num_frames
    samples = torch.stack([
        offset(ta[0], [0.95 * radius[0].item()] * f),   # just inside template 0's radius: a match
        offset(ta[1], [1.05 * radius[1].item()] * f),   # just outside template 1's: nearest, but no match
        offset(ta[2], [-0.5 * radius[2].item()] * f),   # well inside: a match
    ])
    result = evaluate(samples, [A, A, A], world)
    assert result["match_rate"] == pytest.approx(2 / 3)
    assert result["coverage"] == pytest.approx(2 / k)
    assert (result["threshold"], result["match_tolerance_px"]) == (None, 1.0)
    assert result["mean_distance"] == pytest.approx((0.95 * radius[0] + 1.05 * radius[1] + 0.5 * radius[2]).item() / 3)
    # Half a pixel is a smaller radius; an absolute threshold replaces the radius.
    assert match_rate(samples, [A, A, A], world, tolerance_px=0.5) == pytest.approx(1 / 3)
    assert match_rate(samples, [A, A, A], world, threshold=0.1) == 0.0
    assert evaluate(samples, [A, A, A], world, threshold=1.0)["match_tolerance_px"] is None


@pytest.mark.parametrize("num_frames", [12, 36])
def test_frame_error_against_the_nearest_own_template(world, num_frames):
    ta = world.templates(A, num_frames)
    ramp = [0.004 * i for i in range(num_frames)]
    samples = torch.stack([ta[0], offset(ta[4], [0.05] * num_frames), offset(ta[2], ramp)])
    errors = frame_error(samples, [A, A, A], world)
    assert len(errors) == num_frames
    assert errors == pytest.approx([(0.05 + r) / 3 for r in ramp], abs=1e-6)


def test_evaluate_bundles_the_metrics(world):
    ta = world.templates(A)
    samples = torch.stack([ta[0], offset(ta[1], [0.2] * world.num_frames)])
    result = evaluate(samples, [A, A], world, threshold=0.1)
    assert result["match_rate"] == pytest.approx(0.5)
    assert result["coverage"] == pytest.approx(1 / world.templates_per_prompt)
    assert result["coverage_ideal"] == pytest.approx(1 - (1 - 1 / world.templates_per_prompt) ** 2)
    assert result["frame_error"] == pytest.approx([0.1] * world.num_frames, abs=1e-6)
    assert result["mean_distance"] == pytest.approx(0.1, abs=1e-6)
    assert (result["num_samples"], result["num_frames"]) == (2, world.num_frames)
    json.dumps(result)                           # ready for metrics.jsonl as it is


def test_flow_schedule_and_euler_steps():
    s = sigma_grid(4, shift=1.0)
    assert s == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = sigma_grid(4, shift=5.0)
    assert shifted[0] == 1 and shifted[-1] == 0
    assert shifted[2] == pytest.approx(5 * 0.5 / (1 + 4 * 0.5))
    assert sigma_grid(4, shift=1.0, include=[0.6]) == [1.0, 0.75, 0.6, 0.5, 0.25, 0.0]
    # A model whose flow is x - x0 for a fixed x0 and any input: each Euler step on s is exact
    # for the straight path, so the sampler lands on x0 from any noise.
    x0 = torch.full((2, 3, 1, 2, 2), 0.25, dtype=torch.float64)
    noise = torch.randn(2, 3, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = []

    def model(x, t, ctx):
        seen.append(t[0, 0].item())  # timesteps are per frame, [B, F]
        return noise - x0

    out, states = euler_sample(model, noise, shifted, context=None, record=[1.0, shifted[2]])
    assert torch.allclose(out, x0)
    assert seen == pytest.approx([s * 1000 for s in shifted[:-1]])
    assert torch.equal(states[0], noise)  # the state recorded at s = 1 is the initial noise
    assert torch.allclose(states[1], (1 - shifted[2]) * x0 + shifted[2] * noise)  # on the straight path


def test_append_jsonl_writes_one_line_per_evaluation(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    append_jsonl(path, {"step": 0, "match_rate": 0.0, "coverage": 0.0, "frame_error": [1.0, 2.0]})
    append_jsonl(path, {"step": 100, "match_rate": 0.5, "coverage": 0.25,
                        "frame_error": torch.tensor([0.5, 0.75])})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 100]
    assert lines[1]["frame_error"] == [0.5, 0.75]
    with pytest.raises(ValueError, match="lacks \\['coverage'\\]"):
        append_jsonl(path, {"step": 1, "match_rate": 0.0, "frame_error": []})


def test_to_uint8_maps_the_pixel_range():
    clip = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2).expand(2, 3, 2, 2)
    out = to_uint8(clip)
    assert out.shape == (2, 2, 2, 3) and out.dtype == np.uint8
    assert out[0, :, :, 0].tolist() == [[0, 128], [255, 255]]


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_grid_video_writes_a_readable_file(world, tmp_path, suffix):
    prompts = world.prompts[:5]
    clips = torch.stack([world.templates(p, 9)[0] for p in prompts])
    frames = grid_video(clips, prompts, upscale=4)
    assert frames.shape[0] == 9 and frames.dtype == np.uint8
    assert not np.array_equal(frames[0], frames[-1])            # the shapes move
    # On black cells only text is light: the labels add light pixels to the header's.
    dark = -torch.ones_like(clips)
    light = [(grid_video(dark, labels, upscale=4) > 200).sum() for labels in ([""] * 5, prompts)]
    assert light[1] > light[0] > 0
    path = write_video(tmp_path / f"grid{suffix}", frames, fps=4)
    back = iio.imread(path)
    assert back.shape[0] == 9 and back.shape[-1] == 3
    h, w = frames.shape[1:3]
    # The picture survives the round trip (mp4 is lossy, and padded to 16-pixel blocks).
    err = np.abs(back[:, :h, :w].astype(float) - frames.astype(float)).mean()
    assert err < (6.0 if suffix == ".mp4" else 1.0)
    with pytest.raises(ValueError, match="use a .mp4 or .gif"):
        write_video(tmp_path / "grid.avi", frames)
