"""inference.py at tiny size: it reproduces training's evaluation exactly, reads Self-Forcing .pt files,
generates past the training length, names each file after its own item, refuses bad input before writing
anything, names an over-long prompt without echoing it, and keeps diffusers' float32 cast warning quiet."""

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

import train
import engine.inference as inference
import engine.items as items
import engine.student as student
from tests.dist_setup import spawn_ranks
from tests.wan_folder import tiny_wan_folder  # noqa: F401  (a fixture)
from model.wan.text_encoder import WanTextEncoder
from model.wan.transformer import WanDiT
from model.wan.weights import diffusers_to_wan, load_strict, read_state_dict
from tests.train_setup import CONFIGS, TINY, compose_config
from engine.build import build_method
from utils.checkpoint_dirs import find_checkpoint
from engine.config import validate
from engine.evaluation import sample

# The tiny run's model / method / data, for a .pt whose config comes from the groups.
TINY_GROUPS = [o for o in TINY if o.split(".")[0] in student.GROUPS]
# 5 steps: generator updates at 0, 2, 4 and EMA from step 1, so the EMA differs from the generator.
TRAIN = ("max_steps=5", "eval.at_start=false", "checkpoint.keep=1")


def compose_inference(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("inference", overrides=["device=cpu", *overrides])


def infer(out: Path, *overrides: str, groups: list[str] = ()) -> dict:
    return inference.run(compose_inference(*overrides), out, student.group_overrides(list(groups)))


def latents(out: Path, index: dict) -> torch.Tensor:
    return torch.stack([load_file(str(out / item["latents"]))["latents"] for item in index["items"]])


@contextlib.contextmanager
def captured(logger: str):
    """The records `logger` emits inside the block (pytest runs with -p no:logging: no caplog)."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logging.getLogger(logger).addHandler(handler)
    try:
        yield records
    finally:
        logging.getLogger(logger).removeHandler(handler)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster than two fighting
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_config(*TRAIN)
    validate(cfg)
    train.train(cfg, run_dir)
    yield run_dir
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def method_and_ema(run_dir):
    """Training's own method (build_method) with the exported EMA weights: what its evaluation sampled with."""
    method = build_method(compose_config(*TRAIN), torch.device("cpu"))
    generator = WanDiT(**method.generator.config)
    export = find_checkpoint(run_dir) / "export" / "model.safetensors"
    load_strict(generator, read_state_dict(export))
    return method, generator.eval()


def test_run_dir_reproduces_training_evaluation(run_dir, tmp_path):
    record = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    out = tmp_path / "out"
    # prompts=null: the evaluation's list (every world prompt x samples_per_prompt), in one batch as evaluation runs it
    index = infer(out, f"checkpoint={run_dir}", "batch_size=48")
    toy = index["toy_metrics"]
    assert record["step"] == 5 and index["weights"] == "ema" and toy["num_samples"] == 48
    for key in ("match_rate", "coverage", "mean_distance", "frame_error"):
        assert toy[key] == record[key], key  # exactly: same weights, same noise keys, same rollout
    assert sorted(p.name for p in out.iterdir()) == sorted([i["file"] for i in index["items"]] + ["index.json"])
    saved = json.loads((out / "index.json").read_text())
    assert saved["toy_metrics"]["mean_distance"] == record["mean_distance"]
    assert saved["items"][5] == index["items"][5] and saved["items"][5]["file"].startswith("0005_a-red-square-moving-right")
    assert saved["throughput_fps"] > 0 and saved["first_chunk_latency_s"] > 0 and saved["timing"]["batches"] == 1
    assert list(saved)[-3:] == ["throughput_fps", "first_chunk_latency_s", "timing"]


@pytest.mark.parametrize("num_frames", [6, 18])  # the training length, and 3x it through the rolling window
def test_clips_equal_evaluation_sample(run_dir, method_and_ema, tmp_path, num_frames):
    method, generator = method_and_ema
    prompts = ["a red circle moving left", "a blue square moving up", "a green triangle moving down"]
    expected = sample(method, generator, prompts, num_frames, seed=7)
    assert expected.shape == (3, num_frames, 3, 8, 8)
    whole = infer(tmp_path / "whole", f"checkpoint={run_dir}", f"prompts={prompts}", "seed=7", f"num_frames={num_frames}",
                  "batch_size=3", "save_latents=true")
    assert torch.equal(latents(tmp_path / "whole", whole).clamp(-1, 1), expected)  # the identity VAE's decode is a clamp
    assert [i["frames"] for i in whole["items"]] == [num_frames] * 3
    assert iio.imread(tmp_path / "whole" / whole["items"][2]["file"], plugin="FFMPEG").shape[0] == num_frames
    # other batch sizes: the same noise, so the same clips up to float rounding (GEMM blocking depends on the batch)
    split = infer(tmp_path / "split", f"checkpoint={run_dir}", f"prompts={prompts}", "seed=7", f"num_frames={num_frames}",
                  "batch_size=2", "save_latents=true")
    assert (latents(tmp_path / "split", split).clamp(-1, 1) - expected).abs().max() < 1e-5


def test_noise_file_and_seed_list(run_dir, tmp_path):
    """Item i = (prompt i // seeds, seed i % seeds); a noise file equal to the keyed draws changes nothing."""
    prompts = ["a red circle moving left", "a blue square moving up"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")  # blank lines are skipped
    first = infer(tmp_path / "a", f"checkpoint={run_dir}", f"prompts={tmp_path / 'prompts.txt'}", "seed=[3,4]",
                  "save_latents=true")
    assert [(i["prompt"], i["seed"]) for i in first["items"]] == [(p, s) for p in prompts for s in (3, 4)]
    noise = inference.SampleRNG([it.noise_key for it in items.make_items(prompts, [3, 4])]).randn((4, 6, 3, 8, 8))
    torch.save(noise, tmp_path / "noise.pt")
    second = infer(tmp_path / "b", f"checkpoint={run_dir}", f"prompts={prompts}", "seed=[3,4]", "save_latents=true",
                   f"noise={tmp_path / 'noise.pt'}")
    assert torch.equal(latents(tmp_path / "a", first), latents(tmp_path / "b", second))
    assert len({i["file"] for i in first["items"]}) == 4


def test_use_ema_false_loads_the_raw_generator(run_dir, tmp_path):
    prompts = "prompts=[a red circle moving left]"
    ema = infer(tmp_path / "ema", f"checkpoint={run_dir}", prompts, "use_ema=true", "save_latents=true")
    raw = infer(tmp_path / "raw", f"checkpoint={run_dir}", prompts, "use_ema=false", "save_latents=true")
    assert (ema["weights"], raw["weights"]) == ("ema", "generator")
    gap = (latents(tmp_path / "ema", ema) - latents(tmp_path / "raw", raw)).abs().max().item()
    assert gap > 1e-4  # EMA after 3 generator updates is not the generator


def test_self_forcing_pt_equals_export(run_dir, tmp_path):
    """Tiny random weights as an export (diffusers names) and as a Self-Forcing .pt (original Wan names)."""
    config = json.loads((find_checkpoint(run_dir) / "export" / "config.json").read_text())
    torch.manual_seed(11)
    weights = {k: torch.randn_like(v) * 0.1 for k, v in WanDiT(**config["backbone"]).state_dict().items()}
    (tmp_path / "export").mkdir()
    save_file(weights, str(tmp_path / "export" / "model.safetensors"))
    (tmp_path / "export" / "config.json").write_text(json.dumps(config | {"weights": "ema"}))
    wan = {f"model.{k}": v for k, v in diffusers_to_wan(weights).items()}
    assert "model.blocks.0.self_attn.q.weight" in wan
    torch.save({"generator_ema": wan, "generator": {k: v * 0 for k, v in wan.items()}}, tmp_path / "sf.pt")
    prompts = "prompts=[a red circle moving left, a black triangle moving right]"
    from_export = infer(tmp_path / "a", f"checkpoint={tmp_path / 'export' / 'model.safetensors'}", prompts, "save_latents=true")
    from_pt = infer(tmp_path / "b", f"checkpoint={tmp_path / 'sf.pt'}", prompts, "save_latents=true", *TINY_GROUPS)
    assert from_pt["weights"] == "ema" and from_pt["checkpoint"].endswith("sf.pt")
    assert student.resolve_checkpoint(str(tmp_path / "sf.pt"), False).key == "generator"
    a, b = latents(tmp_path / "a", from_export), latents(tmp_path / "b", from_pt)
    assert a.abs().max() > 0.1 and torch.equal(a, b)


LONG_TOY = "a red circle moving left a blue square moving up"  # 10 words: the toy text_len is 8


def test_bad_input_fails_before_any_file(run_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    out = tmp_path / "out"
    export = find_checkpoint(run_dir) / "export" / "model.safetensors"
    cases = [
        ([f"checkpoint={tmp_path / 'nope'}"], [], FileNotFoundError, "does not exist; expected a training run directory"),
        ([f"checkpoint={tmp_path}"], [], FileNotFoundError, "no complete checkpoint"),
        ([f"checkpoint={run_dir}", f"prompts={tmp_path / 'empty.txt'}"], [], ValueError, "holds no prompts"),
        ([f"checkpoint={run_dir}", f"prompts={tmp_path / 'missing.txt'}"], [], FileNotFoundError, "does not exist; expected a text file with one prompt per line"),
        ([f"checkpoint={run_dir}", "num_frames=7"], [], ValueError, "num_frames=7 is impossible.*multiple of num_frame_per_block=2"),
        ([f"checkpoint={run_dir}", "num_frames=0"], [], ValueError, "num_frames=0 is impossible"),
        ([f"checkpoint={run_dir}", f"noise={export}"], [], ValueError, r"expected a tensor .* of shape \(48, 6, 3, 8, 8\)"),
        ([f"checkpoint={run_dir}", "prompts=[a purple circle moving left]"], [], ValueError, "unknown word 'purple'"),
        ([f"checkpoint={run_dir}", "model=toy"], ["model=toy"], ValueError, "picks or removes a config group"),
        ([f"checkpoint={run_dir}", "seed=[]"], [], ValueError, "seed must be an int or a non-empty list"),
        ([f"checkpoint={run_dir}", f"prompts=[a red circle moving left, {LONG_TOY}]"], [], ValueError,
         r"^prompt 1 'a red circle moving left a \.\.\.' has 10 words, more than the text encoder's text_len=8; "),
    ]
    for overrides, groups, error, message in cases:
        with pytest.raises(error, match=message):
            infer(out, *overrides, groups=groups)
        assert not out.exists(), overrides
    # an export of the raw generator (before EMA started) and use_ema=true
    raw = tmp_path / "raw_export"
    shutil.copytree(export.parent, raw)
    config = json.loads((raw / "config.json").read_text())
    (raw / "config.json").write_text(json.dumps(config | {"weights": "generator"}))
    with pytest.raises(ValueError, match="exported before EMA started"):
        infer(out, f"checkpoint={raw / 'model.safetensors'}", "use_ema=true")
    assert not out.exists()


def rank_worker(rank: int, world: int, port: int, out: Path, overrides: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    index = infer(out if rank == 0 else out / f"ignored_{rank}", *overrides)  # rank 0's directory wins
    assert (index == {}) == (rank != 0)
    torch.distributed.barrier()  # tear gloo down together: a rank leaving early can abort the other's gloo threads
    torch.distributed.destroy_process_group()


def test_two_ranks_split_items_and_merge_the_index(run_dir, tmp_path):
    """torchrun-style gloo ranks: items split across ranks, rank 0's index equals a single process's."""
    overrides = [f"checkpoint={run_dir}", "prompts=[a red circle moving left, a blue square moving up, a green circle moving down]",
                 "seed=[0,1]", "batch_size=1", "save_latents=true"]  # batch 1: bit-equal whatever the split
    spawn_ranks(rank_worker, 2, tmp_path / "two", overrides)
    single = infer(tmp_path / "one", *overrides)
    merged = json.loads((tmp_path / "two" / "index.json").read_text())
    assert merged["world_size"] == 2 and len(merged["items"]) == 6 and not (tmp_path / "two" / "ignored_1").exists()
    assert merged["items"] == single["items"] and merged["toy_metrics"] == single["toy_metrics"]
    assert torch.equal(latents(tmp_path / "two", merged), latents(tmp_path / "one", single))


def test_file_names_carry_each_items_own_index_and_seed(run_dir, tmp_path):
    """2 prompts x 2 seeds in batches of 3: each file is named after its item (index, prompt, seed) and holds
    that item's clip, the one the item gives when generated alone."""
    prompts = ["a red circle moving left", "a blue square moving up"]
    overrides = [f"checkpoint={run_dir}", f"prompts={prompts}", "seed=[5,9]", "batch_size=3", "save_latents=true"]
    index = infer(tmp_path / "out", *overrides)
    expected = [(0, prompts[0], 5), (1, prompts[0], 9), (2, prompts[1], 5), (3, prompts[1], 9)]
    assert [(i["index"], i["prompt"], i["seed"]) for i in index["items"]] == expected
    assert [i["file"] for i in index["items"]] == ["0000_a-red-circle-moving-left_seed5.mp4", "0001_a-red-circle-moving-left_seed9.mp4",
                                                   "0002_a-blue-square-moving-up_seed5.mp4", "0003_a-blue-square-moving-up_seed9.mp4"]
    assert all(i["latents"] == i["file"].replace(".mp4", ".latents.safetensors") for i in index["items"])
    plan = inference.prepare(compose_inference(*overrides), [], torch.device("cpu"))
    alone = torch.cat([inference.generate(plan.student, [item], plan.num_frames)[0] for item in plan.items])
    saved = latents(tmp_path / "out", index)
    assert (saved - alone).abs().max() < 1e-5  # float rounding: GEMM blocking depends on the batch
    assert min((saved[a] - saved[b]).abs().max() for a in range(4) for b in range(a)) > 1e-2  # a swap would show
    # two ranks (items 0, 2 and 1, 3), one batch each: the same names, the same clips
    spawn_ranks(rank_worker, 2, tmp_path / "two", overrides)
    merged = json.loads((tmp_path / "two" / "index.json").read_text())
    assert [i["file"] for i in merged["items"]] == [i["file"] for i in index["items"]]
    assert (latents(tmp_path / "two", merged) - alone).abs().max() < 1e-5


def test_over_long_toy_prompt_is_named_not_echoed(run_dir, tmp_path):
    long = " ".join(["a red circle moving left"] * 40)
    with pytest.raises(ValueError) as err:
        infer(tmp_path / "out", f"checkpoint={run_dir}", f"prompts=[a blue square moving up, {long}]")
    message = str(err.value)
    assert message.startswith("prompt 1 'a red circle moving left a ...' has 200 words, more than the text encoder's text_len=8")
    assert len(message) < 200 and "\n" not in message and not (tmp_path / "out").exists()


def test_over_long_wan_prompt_is_truncated_with_one_warning(tiny_wan_folder):
    """Wan's reference (diffusers WanPipeline) truncates to max_sequence_length silently; we truncate the
    same way and say so once, naming the prompt by its first words, its token count and the limit."""
    short = "a red circle moving left"
    long = "a red circle moving left slowly in the forest at sunset with a dog"  # 14 words + </s> = 15 tokens
    other = "a blue car moving up quickly in the street"  # 9 words + </s> = 10 tokens
    encoder = WanTextEncoder(str(tiny_wan_folder), text_len=8, dtype="float32")
    with captured("model.wan.text_encoder") as records:
        out = encoder([short, long])
        encoder([other, long])  # later over-long prompts: truncated quietly
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert message.startswith("prompt 'a red circle moving left slowly ...' has 15 tokens, more than text_len=8: truncated to 8")
    assert long not in message and "\n" not in message
    truncated = encoder([short, " ".join(long.split()[:7])])  # 7 words + </s>: what the encoder kept
    assert out["attention_mask"][1].all() and torch.equal(out["prompt_embeds"], truncated["prompt_embeds"])
    # inference's check up front: every over-long prompt by its index, in one warning; then no other
    fresh = WanTextEncoder(str(tiny_wan_folder), text_len=8, dtype="float32")
    with captured("model.wan.text_encoder") as records:
        fresh.check_prompts([short, long, short, other, long])
        fresh([long, other])
    assert len(records) == 1
    assert records[0].getMessage() == (
        "2 prompt(s) are longer than text_len=8 tokens and are truncated to it, as Wan's reference pipeline does: "
        "prompt 1 'a red circle moving left slowly ...' (15 tokens); prompt 3 'a blue car moving up quickly ...' (10 tokens)")


def test_fp32_cast_warning_is_quiet_only_while_the_student_is_built(run_dir, tmp_path):
    """diffusers warns on every WanDiT.to(dtype) that its _keep_in_fp32_modules should stay float32: not
    printed by inference; other diffusers warnings still are, and the same cast elsewhere still warns."""
    config = json.loads((find_checkpoint(run_dir) / "export" / "config.json").read_text())
    logger = logging.getLogger("diffusers.models.modeling_utils")
    with captured(logger.name) as records:
        infer(tmp_path / "out", f"checkpoint={run_dir}", "prompts=[a red circle moving left]")
        assert records == []
        with student.without_log(*student.FP32_CAST_WARNING):
            logger.warning("another diffusers warning")
        WanDiT(**config["backbone"]).to(dtype=torch.float32)  # outside the build: diffusers' warning as ever
    messages = [r.getMessage() for r in records]
    assert messages[0] == "another diffusers warning" and len(messages) == 2
    assert messages[1].startswith("There are modules in WanDiT that should be kept in float32: ['rope'")
    assert re.match(student.FP32_CAST_WARNING[1], messages[1])
