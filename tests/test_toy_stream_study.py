"""scripts/toy_stream_study.py's definitions on hand-made toy clips: which prompt class a window shows, at any
phase of a template's bouncing path, and the frames until a switched clip shows its new prompt."""

import pytest
import torch

from model.toy.world import ToyWorld
from scripts.toy_stream_study import (frames_to_switch, path_period, prompt_class, segments, summarise_latency,
                                      switch_target, window_scores)

A, B = "a red circle moving left", "a blue circle moving left"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def templates(world, prompt: str, frames: int) -> torch.Tensor:
    """The prompt's templates [K, F, C, H, W], rendered alone (world.templates renders every prompt's)."""
    _, colour, shape, _, _ = prompt.split()
    return world.render(colour, shape, world.centres(prompt, frames))


@pytest.fixture(scope="module")
def world():
    return ToyWorld()


@pytest.fixture(scope="module")
def segs(world):
    return segments(world, 3)  # the script's default: one chunk


def shows(clip, prompt, segs):
    return window_scores(clip, segs).shows(segs.classes.index(prompt_class(prompt)))


def test_classes_targets_and_the_period(world):
    assert prompt_class("a red circle moving left") == prompt_class("a red circle moving right") == ("red", "circle", "horizontal")
    assert prompt_class("a black triangle moving down") == ("black", "triangle", "vertical")
    assert switch_target(A, "colour") == "a green circle moving left"
    assert switch_target("a black triangle moving down", "colour") == "a red triangle moving down"
    assert switch_target(A, "shape") == "a red square moving left"
    assert switch_target(A, "axis") == "a red circle moving up" and switch_target("a red circle moving down", "axis") == A
    with pytest.raises(ValueError, match="switch kind 'size'"):
        switch_target(A, "size")
    # 8 px of travel each way at 0.75 px per frame: the path repeats after 2 * 8 / 0.75 * 3 = 64 frames
    assert path_period(world) == 64
    centres = world.centres(A, 64 + 1)
    assert torch.allclose(centres[:, 0], centres[:, 64]) and not torch.allclose(centres[:, 0], centres[:, 21])


def test_template_windows_show_their_class_at_any_phase(world, segs):
    long = templates(world, A, 100)[:, 64:]  # [6, 36, ...]: frames 64-99, a later phase than any template's start
    for clip in long[[0, 3, 5]]:
        assert shows(clip, A, segs).all()
        assert not shows(clip, B, segs).any()
    # the other direction along the same axis is the same path a little later: the same class, by definition
    assert shows(templates(world, "a red circle moving right", 40)[2], A, segs).all()
    scores = window_scores(long[1], segs)
    assert scores.distance.max() < 1e-3 and scores.within.all()  # a template is at 0 from its own segment (float32)
    mine = segs.classes.index(prompt_class(A))
    assert torch.equal(scores.class_distance[:, mine], scores.distance) and (segs.radius > 0.2).all()
    assert (scores.class_distance[:, segs.classes.index(prompt_class(B))] > 0.3).all()


def test_a_window_off_by_more_than_a_pixel_does_not_show_the_prompt(world, segs):
    centres = world.centres(A, 30)[4]
    near = world.render("red", "circle", centres + torch.tensor([0.0, 0.5], dtype=torch.float64))
    far = world.render("red", "circle", centres + torch.tensor([0.0, 2.0], dtype=torch.float64))  # between two lanes
    assert shows(near, A, segs).all() and not shows(far, A, segs).any()
    # a shape parked at the edge it moved to (the students do not learn to bounce) matches where a template turns
    edge = torch.tensor([[world.radius + 0.5, centres[0, 1].item()]], dtype=torch.float64).expand(8, 2)
    assert shows(world.render("red", "circle", edge), A, segs).all()
    white = torch.ones(12, 3, 16, 16)
    assert not window_scores(white, segs).shows(segs.classes.index(prompt_class(A))).any()
    with pytest.raises(ValueError, match="a clip of 2 frames has no window of 3"):
        window_scores(white[:2], segs)


def test_frames_to_switch_counts_from_the_switch_frame(world, segs):
    """12 frames of A, then B (the same path in another colour) from a hand-picked frame on: windows that hold any
    A frame do not show B (even when B's frames are most of the window), so the first window to show B starts where
    B starts."""
    a, b = templates(world, A, 36)[2], templates(world, B, 36)[2]
    for start, expected in [(12, 0), (15, 3), (20, 8)]:
        clip = torch.cat([a[:start], b[start:]])
        new = shows(clip, B, segs)
        assert frames_to_switch(new, 12) == expected
        assert shows(clip, A, segs)[: start - 5].all() and not shows(clip, A, segs)[start:].any()
    assert frames_to_switch(shows(a, B, segs), 12) is None  # never switched
    summary = summarise_latency([0, 3, None, 8])
    assert summary["switched_fraction"] == 0.75 and summary["median"] == 3 and summary["mean"] == pytest.approx(11 / 3)
