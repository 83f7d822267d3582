"""evaluate.py at tiny size: students and the teacher on the same prompts and seeds (the toy world with two
checkpoints, the tiny random Wan folder), the scores wired to the clips inference.py makes, long-video
drift past the training length, and bad input stopping in one line before anything is written."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import engine.evaluate as ev
import engine.inference as inference
import engine.items as items
import engine.student as student
from engine.build import backbone_config
from engine.validation import teacher_clips
from model.wan.transformer import WanDiT
from model.wan.weights import read_state_dict
from pipeline.ode import sigma_grid
from tests.test_video_metrics import tiny_clip  # noqa: F401  (session fixture)
from tests.train_setup import CONFIGS, TINY
from tests.wan_folder import Z_DIM, tiny_wan_folder  # noqa: F401  (session fixture)
from utils import video_metrics as vm
from utils.video import to_uint8

ROOT = Path(__file__).resolve().parents[1]
TOY = [o for o in TINY if o.split(".")[0] in student.GROUPS]  # the tiny toy run's model / method / data
PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving down"]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster than two fighting
    for var in ("WAN_1_3B_PATH", "WAN_14B_PATH", "WAN_ODE_INIT", "PROMPTS_PATH"):
        monkeypatch.delenv(var, raising=False)
    yield
    torch.set_num_threads(threads)


def compose_eval(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("evaluate", overrides=["device=cpu", *overrides])


def evaluate(out: Path, *overrides: str, groups=TOY) -> dict:
    return ev.run(compose_eval(*overrides, *groups), out, student.group_overrides(list(groups)))


def random_pt(path: Path, seed: int, *overrides: str) -> Path:
    """A Self-Forcing .pt holding random generator_ema weights of the tiny toy backbone."""
    torch.manual_seed(seed)
    net = WanDiT(**backbone_config(compose_eval(*TOY, *overrides)))
    torch.save({"generator_ema": {k: torch.randn_like(v) * 0.1 for k, v in net.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def toy_pts(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return random_pt(root / "a.pt", 1), random_pt(root / "b.pt", 2)


def frames(path: Path) -> np.ndarray:
    return iio.imread(path, index=None)


def captured(logger: str):
    """The records `logger` emits (pytest runs with -p no:logging here: no caplog)."""
    records, handler = [], logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logging.getLogger(logger).addHandler(handler)
    return records, lambda: logging.getLogger(logger).removeHandler(handler)


def test_toy_world_two_students_and_the_teacher(toy_pts, tiny_clip, tmp_path):
    a, b = toy_pts
    out = tmp_path / "out"
    m = evaluate(out, f"checkpoints=[{a},{b}]", f"prompts={PROMPTS}", "teacher.steps=3", f"clip.weights={tiny_clip}",
                 "clip.frames=3", "batch_size=2")  # 3 items: batches of 2 and 1, the caches reused and rebuilt
    stems = [f"000{i}_{items.slug(p)}_seed0" for i, p in enumerate(PROMPTS)]
    assert sorted(p.name for p in out.iterdir()) == ["drift.png", "index.html", "metrics.json", "side_by_side", "videos"]
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["a", "b", "teacher"]
    for folder in ("videos/a", "videos/b", "videos/teacher", "side_by_side"):
        assert sorted(p.name for p in (out / folder).iterdir()) == [f"{s}.mp4" for s in stems]
    assert frames(out / "videos" / "a" / f"{stems[0]}.mp4").shape == (6, 16, 16, 3)  # 6 toy frames of 8 x 8, padded
    side = frames(out / "side_by_side" / f"{stems[0]}.mp4")
    assert side.shape[0] == 6 and side.shape[2] > 3 * 8 * 52  # three columns, cells upscaled to 416 pixels

    saved = json.loads((out / "metrics.json").read_text())
    assert saved == {k: v for k, v in m.items() if k != "output_dir"}
    assert list(m["models"]) == ["teacher", "a", "b"] and m["models"]["a"]["weights"] == "ema"
    assert m["models"]["teacher"] == {"steps": 3, "guidance_scale": 2.0, "negative_prompt": ""}  # 1 + the toy's 1.0
    assert m["clip"] == {"weights": str(tiny_clip), "frames": 3, "backend": "transformers"}
    assert set(m["skipped"]) == {"lpips", "vbench"} and all("\n" not in v for v in m["skipped"].values())
    assert not m["past_training_length"] and m["pixel_frames"] == 6 and m["models"]["b"]["training_pixel_frames"] == 6
    assert set(m["items"][0]["scores"]["teacher"]) == {"flicker", "clip_score", "consistency"}
    assert set(m["items"][0]["scores"]["a"]) == {"flicker", "clip_score", "consistency", "psnr_vs_teacher"}
    for name in ("teacher", "a", "b"):  # the means are the means of the rows
        for key, mean in m["mean"][name].items():
            assert mean == pytest.approx(np.mean([it["scores"][name][key] for it in m["items"]]), abs=1e-12), (name, key)
        assert len(m["per_frame"][name]["flicker"]) == 5 and len(m["per_frame"][name]["clip_score"]) == 6
    assert m["mean"]["a"]["flicker"] != m["mean"]["b"]["flicker"]  # two students, two rows
    assert m["speed"]["a"]["throughput_fps"] > 0 and m["speed"]["a"]["first_chunk_latency_s"] > 0
    assert m["speed"]["a"]["timing"]["batches"] == 2 and "throughput_fps_after_first_batch" in m["speed"]["a"]
    assert m["speed"]["teacher"]["throughput_fps"] > 0 and m["speed"]["teacher"]["frames"] == 18
    page = (out / "index.html").read_text()
    assert all(f'src="side_by_side/{s}.mp4"' in page for s in stems) and 'src="drift.png"' in page
    assert (out / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The scores are those of the clips inference makes: the student's from inference's own generate, the
    # teacher's from validation's teacher_clips one item at a time (the same noise as the student's).
    cfg = compose_eval(f"checkpoints=[{a}]", f"prompts={PROMPTS}", "teacher.steps=3", *TOY)
    plan = inference.prepare(ev.inference_config(cfg, str(a)), student.group_overrides(TOY), CPU)
    teacher = ev.build_teacher(cfg, plan, student.group_overrides(TOY), CPU)
    _, pixels, _ = inference.generate(plan.student, plan.items[:2], plan.num_frames)  # the first batch as evaluated
    scorer = vm.load_clip(str(tiny_clip), "unused", CPU)
    for k, item in enumerate(plan.items[:2]):
        ours = vm.unit_frames(to_uint8(pixels[k]))
        ref = teacher_clips(teacher, plan.student, plan.student.vae, [item], plan.num_frames, sigma_grid(3, plan.student.cfg.timestep_shift),
                            None, 1.0)  # guidance 2 on the exact toy teacher: its uncond below
        scores = m["items"][k]["scores"]
        assert scores["a"]["flicker"] == pytest.approx(vm.flicker_by_frame(ours).mean().item(), abs=1e-7)
        assert scores["a"]["clip_score"] == pytest.approx(vm.clip_scores(scorer, ours, item.prompt, 3).clip_score, abs=1e-6)
        assert ref.shape == (1, 6, 3, 8, 8)
    uncond = plan.student.encode([""])
    ref = teacher_clips(teacher, plan.student, plan.student.vae, plan.items[2:], plan.num_frames,
                        sigma_grid(3, plan.student.cfg.timestep_shift), uncond, 2.0)
    ref = vm.unit_frames(to_uint8(ref[0]))
    assert m["items"][2]["scores"]["teacher"]["flicker"] == pytest.approx(vm.flicker_by_frame(ref).mean().item(), abs=1e-6)
    # inference.py writes the same student video for the same checkpoint, prompt and seed
    index = inference.run(ev.inference_config(cfg, str(a)), tmp_path / "inference", student.group_overrides(TOY))
    assert np.array_equal(frames(tmp_path / "inference" / index["items"][1]["file"]), frames(out / "videos" / "a" / f"{stems[1]}.mp4"))


def test_long_video_drift_past_the_training_length(toy_pts, tiny_clip, tmp_path):
    m = evaluate(tmp_path / "long", f"checkpoints={toy_pts[0]}", f"prompts={PROMPTS[:2]}", "num_frames=12",
                 "teacher.steps=2", f"clip.weights={tiny_clip}", "vbench.dimensions=[]")
    assert m["past_training_length"] and m["num_frames"] == m["pixel_frames"] == 12  # the toy VAE is the identity
    assert m["models"]["a"]["training_pixel_frames"] == 6
    curves = m["per_frame"]["a"]
    assert [len(curves[k]) for k in ("consistency", "flicker", "clip_score")] == [11, 11, 12]
    # the curves are the means over prompts of each video's per-frame scores
    clips = [frames(tmp_path / "long" / "videos" / "a" / f) for f in sorted(p.name for p in (tmp_path / "long" / "videos" / "a").iterdir())]
    assert all(c.shape[0] == 12 for c in clips)
    assert all(0 <= v <= 1 for v in curves["flicker"]) and all(-1 <= v <= 1 for v in curves["consistency"])
    assert curves["flicker"] != m["per_frame"]["teacher"]["flicker"]
    assert "vbench" not in m["skipped"]  # none asked for
    assert (tmp_path / "long" / "drift.png").stat().st_size > 10_000


def test_missing_clip_weights_skip_its_scores_in_one_line_and_videos_false(toy_pts, tmp_path):
    records, remove = captured("utils.distributed")
    try:
        m = evaluate(tmp_path / "out", f"checkpoints={toy_pts[0]}", f"prompts={PROMPTS[:1]}", "clip.weights=/no/clip",
                     "teacher.enabled=false", "videos=false")
    finally:
        remove()
    reason = ("CLIP scores (clip_score, consistency) skipped: clip.weights=/no/clip does not exist; pass the local path "
              "of CLIP weights (an open-clip folder or file, or a transformers CLIP folder)")
    assert m["skipped"]["clip"] == reason and reason in [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert m["skipped"]["lpips"] == "LPIPS skipped: teacher.enabled=false (it compares students with the teacher)"
    assert list(m["models"]) == ["a"] and set(m["items"][0]["scores"]["a"]) == {"flicker"}  # the rest runs
    assert m["skipped"]["vbench"] == "VBench skipped: videos=false (it scores the mp4 files)"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["drift.png", "index.html", "metrics.json"]  # videos=false
    assert m["items"][0]["side_by_side"] is None and "<video" not in (tmp_path / "out" / "index.html").read_text()


def test_tiny_wan_folder(tiny_wan_folder, tiny_clip, tmp_path):
    """A Self-Forcing .pt of the tiny Wan folder's transformer: the real VAE, UMT5 and a CFG'd Wan teacher."""
    torch.save({"generator_ema": read_state_dict(tiny_wan_folder)}, tmp_path / "wan.pt")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car moving left\n\nthe dog in the forest\n")
    groups = ["model=wan2.1_t2v_1.3b", f"model.path={tiny_wan_folder}", "model.dtype=float32", f"model.latent_shape=[{Z_DIM},4,4]",
              "model.text_encoder.text_len=16", "data=prompts", f"data.prompts.path={prompts}", "method.num_training_frames=2",
              "method.num_frame_per_block=1", "method.denoising_step_list=[1000,500]", "method.guidance_scale=3.0",
              "method.negative_prompt=blurry static"]
    m = evaluate(tmp_path / "out", f"checkpoints={tmp_path / 'wan.pt'}", "names=[sf]", f"prompts={prompts}", "seed=[0,1]",
                 "teacher.steps=2", f"clip.weights={tiny_clip}", groups=groups)
    assert m["models"]["teacher"] == {"steps": 2, "guidance_scale": 4.0, "negative_prompt": "blurry static"}
    assert m["pixel_frames"] == 5 and [(it["prompt"], it["seed"]) for it in m["items"]] == [
        ("a red car moving left", 0), ("a red car moving left", 1), ("the dog in the forest", 0), ("the dog in the forest", 1)]
    video = frames(tmp_path / "out" / m["items"][3]["videos"]["sf"])
    assert video.shape == (5, 32, 32, 3)  # 2 latent frames through the 4x temporal, 8x spatial VAE
    assert 0 < m["mean"]["sf"]["psnr_vs_teacher"] < vm.PSNR_CAP and len(m["per_frame"]["teacher"]["consistency"]) == 4
    cfg = compose_eval(f"checkpoints={tmp_path / 'wan.pt'}", f"prompts={prompts}", "seed=[0,1]", *groups)
    index = inference.run(ev.inference_config(cfg, str(tmp_path / "wan.pt")), tmp_path / "inference", student.group_overrides(groups))
    assert np.array_equal(frames(tmp_path / "inference" / index["items"][3]["file"]), video)  # inference.py's video


def test_bad_input_is_one_line_and_writes_nothing(toy_pts, tmp_path, monkeypatch):
    a = toy_pts[0]
    (tmp_path / "empty.txt").write_text("\n  \n")
    big = random_pt(tmp_path / "big.pt", 3, "model.backbone.num_layers=3")  # another model size
    out = tmp_path / "out"
    cases = [
        ([f"checkpoints={a}", f"prompts={tmp_path / 'empty.txt'}"], "holds no prompts"),
        ([f"checkpoints=[{a},{big}]"], rf"^checkpoint={big} does not fit the model its config describes \(another model size\?\)"),
        (["checkpoints=[]"], r"^checkpoints must be a checkpoint path or a non-empty list of them, got \[\]"),
        ([f"checkpoints={a}", "names=[teacher]"], r"^names\[0\]='teacher': a row name is"),
        ([f"checkpoints=[{a},{a}]", "names=[x,x]"], r"^names must differ"),
        ([f"checkpoints={a}", "teacher.steps=0"], r"^teacher.steps must be >= 1, got 0"),
        ([f"checkpoints={a}", "vbench.dimensions=[color]"], r"^vbench.dimensions has \['color'\]"),
        ([f"checkpoints={a}", "num_frames=5"], r"^num_frames=5 is impossible for this checkpoint"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            evaluate(out, *overrides)
        assert "\n" not in str(error.value), str(error.value)
        assert not out.exists(), overrides
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "imageio_ffmpeg", None)  # not installed: named before any video is made
        with pytest.raises(ValueError, match=r"^videos=true writes mp4 files through imageio-ffmpeg, which is not installed"):
            evaluate(out, f"checkpoints={a}")
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"^output_dir={out} already holds an evaluation \(metrics.json\); pass overwrite=true"):
        evaluate(out, f"checkpoints={a}")


@pytest.mark.slow  # a fresh interpreter's imports: about 10 s on a shared CPU
def test_entry_point_error_is_one_line(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run([sys.executable, "evaluate.py", f"checkpoints={tmp_path / 'none.pt'}", "device=cpu",
                           f"prompts={tmp_path / 'empty.txt'}", f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-2] == (f"error: checkpoint={tmp_path / 'none.pt'} does not exist; expected {student.CHECKPOINT_FORMS} "
                         f"(nothing was written: the run directory {run_dir} was removed)")
    assert lines[-1] == "(HYDRA_FULL_ERROR=1 shows the traceback)" and not run_dir.exists()


def test_bench_script_at_tiny_size(tmp_path):
    """scripts/bench_evaluate.py's CPU path: the assets written once, evaluate's own run timed by phase."""
    from scripts import bench_evaluate

    args = ["--tiny", "--device", "cpu", "--root", str(tmp_path), "--prompts", "3", "--batch-size", "2", "--teacher-steps", "2",
            "--out", str(tmp_path / "bench.json"), "vbench.dimensions=[]"]
    summary = bench_evaluate.main(args)
    assert json.loads((tmp_path / "bench.json").read_text()) == summary
    assert summary["video_frames"] == 5 and summary["teacher_steps"] == 2 and summary["student_fps"] > 0
    assert summary["videos"] and set(summary["wall"]) == {"load_s", "teacher_s", "students_s", "write_videos_s", "total_s"}
    assert summary["wall"]["total_s"] <= summary["total_s"]
    metrics = json.loads((tmp_path / "tiny" / "evaluation" / "metrics.json").read_text())
    assert list(metrics["models"]) == ["teacher", "student"] and len(metrics["items"]) == 3
    assert metrics["clip"]["backend"] == "transformers" and "vbench" not in metrics["skipped"]
    assert len(bench_evaluate.prompts(16)) == len(set(bench_evaluate.prompts(16))) == 16


def test_non_finite_values_are_null_in_metrics_json():
    from engine.evaluate_outputs import finite

    bad = []
    assert finite({"a": [1.0, float("nan")], "b": {"c": float("inf"), "d": "x"}}, "", bad) == {"a": [1.0, None], "b": {"c": None, "d": "x"}}
    assert bad == ["a[1]", "b.c"]
