"""utils/video_metrics.py on hand-made clips: flicker, CLIP consistency and text score, PSNR, frame sampling;
CLIP from tiny random models written to disk (a transformers CLIPModel always; an open-clip CLIP where
open-clip imports) and loaded by path; LPIPS and VBench report why they cannot run instead of running."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.wan_folder import VOCAB, _tokenizer
from utils import video_metrics as vm

PROMPT = "a red circle moving left"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiny_clip(root: Path) -> Path:
    """A random transformers CLIPModel at toy size with the tiny Wan folder's word tokenizer (no download)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, eos_token_id=1, bos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(root)
    _tokenizer().save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def moving_square(frames: int = 12, size: int = 32) -> np.ndarray:
    """uint8 [F, H, W, 3]: a white square moving right by 2 pixels a frame while the background fades from
    red to blue (a random CLIP hardly sees where a square is, but it sees the colour of the whole frame)."""
    clip = np.zeros((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        clip[t, ..., 0], clip[t, ..., 2] = round(255 * (1 - t / (frames - 1))), round(255 * t / (frames - 1))
        clip[t, 10:20, 2 + 2 * t : 12 + 2 * t] = 255
    return clip


# ---------------------------------------------------------------------------- pixel scores
def test_flicker_and_psnr_on_hand_made_clips():
    still = np.repeat(moving_square()[:1], 6, axis=0)
    assert vm.flicker_by_frame(vm.unit_frames(still)).tolist() == [0.0] * 5
    blink = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    blink[1::2] = 255  # black, white, black, white
    assert vm.flicker_by_frame(vm.unit_frames(blink)).tolist() == [1.0, 1.0, 1.0]
    ramp = np.stack([np.full((8, 8, 3), v, dtype=np.uint8) for v in (0, 51, 102)])
    assert torch.allclose(vm.flicker_by_frame(vm.unit_frames(ramp)), torch.tensor([0.2, 0.2]))

    clip = moving_square()
    order = vm.flicker_by_frame(vm.unit_frames(clip)).mean().item()
    shuffled = clip[np.random.default_rng(0).permutation(len(clip))]
    assert vm.flicker_by_frame(vm.unit_frames(shuffled)).mean().item() > 2 * order > 0

    a = vm.unit_frames(np.full((3, 8, 8, 3), 100, dtype=np.uint8))
    b = vm.unit_frames(np.full((3, 8, 8, 3), 110, dtype=np.uint8))
    assert vm.psnr(a, a) == vm.PSNR_CAP == 100.0  # identical: the cap, not inf (metrics.json stays JSON)
    assert vm.psnr(a, b) == pytest.approx(20 * math.log10(25.5), abs=1e-5)  # MSE (10 / 255)^2
    with pytest.raises(ValueError, match="different shapes"):
        vm.psnr(a, b[:2])
    with pytest.raises(ValueError, match=r"uint8 frames \[F, H, W, 3\]"):
        vm.unit_frames(np.zeros((3, 8, 8), dtype=np.uint8))


def test_consistency_and_sampling_on_hand_made_features():
    e = torch.eye(3)
    assert vm.consistency_by_frame(torch.stack([e[0], 2 * e[0], e[1], -e[1]])).tolist() == [1.0, 0.0, -1.0]
    assert vm.sample_indices(81, 8) == [0, 11, 23, 34, 46, 57, 69, 80]
    assert vm.sample_indices(5, None) == vm.sample_indices(5, 9) == [0, 1, 2, 3, 4]
    assert vm.sample_indices(5, 1) == [2]
    assert vm.mean_curves([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]) == [2.0, 3.0]


# ---------------------------------------------------------------------------- CLIP
def test_clip_scores_of_a_still_a_moving_and_a_shuffled_clip(tiny_clip):
    scorer = vm.load_clip(str(tiny_clip), "unused", "cpu")
    assert scorer.backend == "transformers" and scorer.image_size == (32, 32) and scorer.mean == vm.CLIP_MEAN

    clip = moving_square()
    still = vm.clip_scores(scorer, vm.unit_frames(np.repeat(clip[:1], 6, axis=0)), PROMPT, 3)
    assert still.consistency == pytest.approx(1.0, abs=1e-6)  # identical frames: consistency 1
    assert still.consistency_by_frame.shape == (5,) and still.clip_score_by_frame.shape == (6,)
    one = (scorer.images(vm.unit_frames(clip[:1])) @ scorer.texts([PROMPT])[0]).item()
    assert still.clip_score == pytest.approx(one, abs=1e-6)  # every frame scores as the frame alone

    moving = vm.clip_scores(scorer, vm.unit_frames(clip), PROMPT, 4)
    shuffled = vm.clip_scores(scorer, vm.unit_frames(clip[np.random.default_rng(0).permutation(len(clip))]), PROMPT, 4)
    assert still.consistency > moving.consistency > shuffled.consistency  # a shuffled clip scores worse
    # the text score averages the sampled frames (0, 4, 7, 11 of 12) of the per-frame curve
    assert moving.clip_score == pytest.approx(moving.clip_score_by_frame[[0, 4, 7, 11]].mean().item(), abs=1e-6)
    features = scorer.images(vm.unit_frames(clip), batch=5)  # batching does not change the features
    assert torch.allclose(features, scorer.images(vm.unit_frames(clip), batch=64), atol=1e-5)
    assert torch.allclose(features.norm(dim=-1), torch.ones(12))


def test_clip_preprocessing_resizes_the_shorter_side_and_crops():
    scorer = vm.ClipScorer(lambda x: x, lambda p: p, (4, 4), (0.25, 0.0, 0.0), (0.5, 1.0, 1.0), torch.device("cpu"), "t", "t")
    # a horizontal ramp over a 2:1 frame: pixel x holds (x + 0.5) / 16 at its centre
    frames = ((torch.arange(16) + 0.5) / 16).expand(1, 3, 8, 16).clone()
    out = scorer.preprocess(frames)  # 8 x 16 -> 4 x 8 (pixel j at input 2j + 1) -> the centre 4 columns, j = 2..5
    assert out.shape == (1, 3, 4, 4)
    expected = torch.tensor([5.0, 7.0, 9.0, 11.0]) / 16  # a cubic kernel keeps a linear ramp linear
    assert torch.allclose(out[0, 1], expected.expand(4, 4), atol=1e-5)
    assert torch.allclose(out[0, 0], ((expected - 0.25) / 0.5).expand(4, 4), atol=1e-5)  # CLIP's normalisation


def test_clip_weight_errors_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^clip.weights is null; pass the local path"):
        vm.load_clip(None, "ViT-B-32", "cpu")
    with pytest.raises(FileNotFoundError, match=f"^clip.weights={tmp_path / 'nope'} does not exist"):
        vm.load_clip(str(tmp_path / "nope"), "ViT-B-32", "cpu")
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "open_clip_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds open_clip_config.json but none of"):
        vm.load_clip(str(tmp_path / "oc"), "ViT-B-32", "cpu")  # open-clip would build random weights and go on
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="of model_type 't5', not 'clip'"):
        vm.load_clip(str(tmp_path / "t5"), "ViT-B-32", "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is neither an open-clip folder"):
        vm.load_clip(str(tmp_path / "empty"), "ViT-B-32", "cpu")


def _open_clip():
    try:
        import open_clip
    except Exception as e:  # a torchvision built for another torch raises a RuntimeError at import
        pytest.skip(f"open-clip does not import here: {type(e).__name__}: {str(e).splitlines()[0]}")
    return open_clip


def test_tiny_open_clip_folder_and_file(tmp_path):
    open_clip = _open_clip()
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model_cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    model = open_clip.CLIP(**model_cfg).eval()
    folder = tmp_path / "tiny-open-clip"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    scorer = vm.load_clip(str(folder), "unused", "cpu")
    assert scorer.backend == "open_clip" and scorer.image_size == (32, 32) and scorer.mean == (0.5, 0.5, 0.5)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the same BPE tokenizer the folder's text_cfg implies
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_text(tokenizer([PROMPT])), dim=-1)
    assert torch.allclose(scorer.texts([PROMPT]), expected, atol=1e-6)  # the weights on disk, not random ones
    still = vm.clip_scores(scorer, vm.unit_frames(np.repeat(moving_square()[:1], 4, axis=0)), PROMPT, 2)
    assert still.consistency == pytest.approx(1.0, abs=1e-6)


def test_lpips_and_vbench_say_why_they_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    distance, reason = vm.load_lpips("alex", "cpu")
    assert distance is None and reason.startswith("LPIPS skipped: ") and "\n" not in reason
    dims, _, reasons = vm.vbench_dimensions(["temporal_flickering"], str(tmp_path))
    try:
        import vbench  # noqa: F401
    except Exception:
        assert dims == [] and len(reasons) == 1 and reasons[0].startswith("VBench skipped: the vbench package does not import")
    else:  # its weights-free dimension runs; one that needs weights names the missing file
        assert dims == ["temporal_flickering"]
        assert vm.vbench_dimensions(["dynamic_degree"], str(tmp_path))[2] == [
            f"VBench dynamic_degree skipped: {tmp_path}/raft_model/models/raft-things.pth is missing (vbench.cache_dir={tmp_path})"]
    assert vm.vbench_dimensions([], None) == ([], None, [])


def test_lpips_with_backbone_weights_in_the_hub_cache(tmp_path, monkeypatch):
    """Where lpips imports: with (random) AlexNet weights under torchvision's file name, LPIPS runs offline."""
    try:
        import lpips  # noqa: F401
        import torchvision.models as tv
    except Exception as e:
        pytest.skip(f"lpips does not import here: {type(e).__name__}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    name = Path(tv.AlexNet_Weights.IMAGENET1K_V1.url).name
    distance, reason = vm.load_lpips("alex", "cpu")
    assert distance is None and reason == f"LPIPS skipped: torchvision's alex weights are not at {tmp_path}/torch/hub/checkpoints/{name} (put {name} there)"
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(tv.alexnet().state_dict(), tmp_path / "torch" / "hub" / "checkpoints" / name)
    distance, reason = vm.load_lpips("alex", "cpu")
    a = vm.unit_frames(moving_square(4, 64))
    assert reason is None and distance(a, a) == pytest.approx(0.0, abs=1e-7) and distance(a, a.flip(0)) > 1e-4
