"""Validation videos during training (engine/validation.py): eval.prompts x eval.seeds through the
inference rollout at every evaluation, the teacher's once per run, on the tiny random Wan folder and
on the toy world; the toy default (eval.prompts null) writes nothing new."""

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import engine.validation
import tests.test_wan_training as wan  # a module, not its names: pytest would collect its tests here again
import train
from engine.config import validate
from engine.trainer import Trainer
from tests.train_setup import compose_config
from tests.wan_folder import tiny_wan_folder  # noqa: F401  (session fixture)
from utils.distributed import destroy, init_distributed, single_process_group

EVAL_PROMPTS = ["a red circle moving left", "the dog in the forest at sunset"]
VIDEOS = ["p00_s0.mp4", "p00_s1.mp4", "p01_s0.mp4", "p01_s1.mp4"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    torch.set_num_threads(1)
    for var in ("WAN_1_3B_PATH", "WAN_14B_PATH", "WAN_ODE_INIT", "PROMPTS_PATH", "LATENTS_PATH", "ODE_PAIRS_PATH"):
        monkeypatch.delenv(var, raising=False)


def eval_prompt_file(tmp_path: Path, prompts=EVAL_PROMPTS) -> Path:
    path = tmp_path / "eval_prompts.txt"
    path.write_text("\n".join([prompts[0], "", *prompts[1:]]) + "\n")
    return path


def wan_eval_config(folder, tmp_path, *overrides):
    """The tiny Wan DMD run of test_wan_training with validation videos at every step."""
    return wan.wan_config(folder, f"data.prompts.path={wan.prompt_file(tmp_path)}", "model.text_encoder.text_len=16",
                          f"eval.prompts={eval_prompt_file(tmp_path)}", "eval.seeds=[0,1]", "eval.every=1",
                          "eval.teacher_steps=3", *overrides)


def frames(path: Path) -> np.ndarray:
    return iio.imread(path, index=None)


def count_calls(monkeypatch, name: str) -> list:
    """Record the outputs of engine.validation.<name> (it still runs)."""
    real, seen = getattr(engine.validation, name), []

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(engine.validation, name, spy)
    return seen


def test_wan_run_writes_videos_at_every_evaluation_and_the_teachers_once(tiny_wan_folder, tmp_path, monkeypatch):
    cfg = wan_eval_config(tiny_wan_folder, tmp_path, "eval.at_start=true", "checkpoint.every=1")
    validate(cfg)
    run_dir = tmp_path / "run"
    teacher_calls = count_calls(monkeypatch, "euler_sample")
    train.train(cfg, run_dir)
    samples = run_dir / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step_000000", "step_000001", "step_000002", "teacher"]
    for folder in samples.iterdir():
        assert sorted(p.name for p in folder.iterdir()) == sorted([*VIDEOS, "grid.mp4", "index.json"]), folder
        index = json.loads((folder / "index.json").read_text())
        assert [(i["file"], i["prompt"], i["seed"]) for i in index["items"]] == [
            (v, EVAL_PROMPTS[int(v[1:3])], int(v[5])) for v in VIDEOS]
        for video in VIDEOS:
            assert frames(folder / video).shape == (1 + 4 * 1, 32, 32, 3)  # 2 latent frames through the 4x VAE
        assert frames(folder / "grid.mp4").shape[0] == 5
    assert len(teacher_calls) == len(VIDEOS)  # the teacher's videos once per run, not at each evaluation
    teacher = json.loads((samples / "teacher" / "index.json").read_text())
    assert teacher["settings"]["guidance_scale"] == 1 + cfg.method.guidance_scale  # the CFG'd score DMD distils
    assert teacher["settings"]["negative_prompt"] == cfg.method.negative_prompt
    assert json.loads((samples / "step_000002" / "index.json").read_text())["weights"] == "generator"  # EMA from 200
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert {"samples/p01_s1", "samples/grid", "teacher_samples/grid"} <= {k for row in logged for k in row}
    # The same prompt and seed, the same noise: the teacher starts where the student does, and a
    # prompt's two seeds (or a seed's two prompts) differ.
    step2 = {v: frames(samples / "step_000002" / v).astype(int) for v in VIDEOS}
    assert np.abs(step2["p00_s0.mp4"] - step2["p00_s1.mp4"]).mean() > 1
    assert np.abs(step2["p00_s0.mp4"] - step2["p01_s0.mp4"]).mean() > 1

    # inference.py draws the same noise for the same prompts and seeds: the step's export gives its videos
    from hydra import compose, initialize_config_dir

    from engine import inference
    from tests.train_setup import CONFIGS

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        icfg = compose("inference", overrides=["device=cpu", f"checkpoint={run_dir}", "batch_size=1", "seed=[0,1]",
                                               f"prompts={eval_prompt_file(tmp_path)}"])
    index = inference.run(icfg, tmp_path / "inference", [])
    for item, video in zip(index["items"], VIDEOS):
        ours = frames(tmp_path / "inference" / item["file"]).astype(int)
        assert np.abs(ours - step2[video]).max() <= 2, video  # the same clip (identical here; 2: uint8 rounding)

    # a resumed run evaluates on, and finds the teacher's videos of these settings already there
    written = {p.name: p.stat().st_mtime_ns for p in (samples / "teacher").iterdir()}
    monkeypatch.setattr(engine.validation, "euler_sample", lambda *a, **k: pytest.fail("teacher sampled again"))
    train.train(wan_eval_config(tiny_wan_folder, tmp_path, "max_steps=3", "resume=latest"), run_dir)
    assert (samples / "step_000003" / "grid.mp4").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in (samples / "teacher").iterdir()} == written


def test_two_evaluations_of_the_same_weights_give_the_same_videos(tiny_wan_folder, tmp_path, monkeypatch):
    cfg = wan_eval_config(tiny_wan_folder, tmp_path, "eval.teacher=false")
    clips = count_calls(monkeypatch, "sample_with")
    dist = init_distributed()
    own_group = single_process_group(dist)
    try:
        trainer = Trainer(cfg, tmp_path / "run", dist)
        trainer.evaluate(5)
        torch.manual_seed(123), torch.randn(100)  # other draws in between: the videos' noise is keyed, not global
        trainer.evaluate(5)
        trainer.tracker.finish()
    finally:
        if own_group:
            destroy()
    first, again = clips[:4], clips[4:]
    assert len(first) == len(again) == 4 and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])  # seed 0 and seed 1 of one prompt
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["step_000005"]  # eval.teacher=false


def test_toy_world_validation_videos_beside_its_metrics(tmp_path):
    """eval.prompts works on the toy world too (exact teacher, identity VAE), next to the toy's own grids."""
    bad = eval_prompt_file(tmp_path)  # words the toy text encoder does not know: named at start, with the key
    with pytest.raises(ValueError, match=f"^eval.prompts={bad}: unknown word 'the' in prompt 1"):
        train.train(compose_config(f"eval.prompts={bad}"), tmp_path / "bad")
    prompts = eval_prompt_file(tmp_path, ["a red circle moving left", "a blue square moving up"])
    cfg = compose_config("max_steps=1", "checkpoint.every=0", f"eval.prompts={prompts}", "eval.teacher_steps=3")
    validate(cfg)
    run_dir = tmp_path / "toy"
    train.train(cfg, run_dir)
    samples = run_dir / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step_000001", "step_000001.gif", "step_000001.mp4", "teacher"]
    for folder in ("step_000001", "teacher"):
        assert sorted(p.name for p in (samples / folder).iterdir()) == ["grid.mp4", "index.json", "p00_s0.mp4", "p01_s0.mp4"]
    assert frames(samples / "teacher" / "p00_s0.mp4").shape == (6, 16, 16, 3)  # 8 x 8 toy frames, padded to 16
    assert (run_dir / "metrics.jsonl").is_file()  # the toy's metrics as before


def test_a_missing_or_empty_prompt_file_or_bad_seeds_are_one_line_errors_naming_the_key(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(FileNotFoundError, match=f"^eval.prompts={missing} does not exist") as error:
        validate(compose_config(f"eval.prompts={missing}"))
    assert "\n" not in str(error.value)
    for text in ("", "\n  \n"):
        empty = tmp_path / "empty.txt"
        empty.write_text(text)
        with pytest.raises(ValueError, match=f"^eval.prompts={empty} holds no prompts") as error:
            validate(compose_config(f"eval.prompts={empty}"))
        assert "\n" not in str(error.value)
    prompts = eval_prompt_file(tmp_path)
    for seeds in ("[]", "[1,1]"):
        with pytest.raises(ValueError, match="eval.seeds must be a non-empty list of distinct ints"):
            validate(compose_config(f"eval.prompts={prompts}", f"eval.seeds={seeds}"))
    with pytest.raises(ValueError, match="eval.teacher_steps must be >= 1"):
        validate(compose_config("eval.teacher_steps=0"))


# one global batch of 2 on either world size, so the step-1 weights agree up to float rounding
TWO_RANK_RUN = ("max_steps=1", "total_batch_size=2", "eval.at_start=true", "eval.teacher_steps=2")


def _two_rank_worker(rank, world, port, folder, tmp_path):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train.train(wan_eval_config(Path(folder), Path(tmp_path), *TWO_RANK_RUN), Path(tmp_path) / "two_ranks")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes of the tiny Wan run and one more: about 30 s on a shared CPU
def test_on_two_ranks_every_rank_generates_and_rank_zero_writes_the_videos_of_one_process(tiny_wan_folder, tmp_path):
    """The generator, teacher and text encoder are sharded: each video's forwards are collectives of both
    ranks (a rank that skipped them would hang the other); the files are those of one process."""
    from tests.dist_setup import spawn_ranks

    spawn_ranks(_two_rank_worker, 2, str(tiny_wan_folder), str(tmp_path))
    train.train(wan_eval_config(tiny_wan_folder, tmp_path, *TWO_RANK_RUN), tmp_path / "one")  # 2 micro-batches
    for folder in ("step_000000", "step_000001", "teacher"):
        two, one = tmp_path / "two_ranks" / "samples" / folder, tmp_path / "one" / "samples" / folder
        assert sorted(p.name for p in two.iterdir()) == sorted([*VIDEOS, "grid.mp4", "index.json"])
        for video in ("p00_s0.mp4", "p01_s1.mp4"):
            assert np.abs(frames(two / video).astype(int) - frames(one / video).astype(int)).max() <= 2, (folder, video)
