"""Inference is safe to point at other people's files: an export's config.json builds only the project's
own classes (a crafted `_target_` is refused before anything runs), and a reused output_dir is refused,
or with overwrite=true cleared of exactly the earlier run's files."""

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

import engine.inference as inference
import engine.student as student
from engine.build import backbone_config
from model.wan.transformer import WanDiT
from tests.test_inference import compose_inference
from tests.train_setup import compose_config

PROMPT = "prompts=[a red circle moving left]"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny export as training writes it (engine/trainer.py export): random weights, the toy config."""
    cfg = compose_config()
    config = {"backbone": backbone_config(cfg), "method": OmegaConf.to_container(cfg.method, resolve=True),
              "model": OmegaConf.to_container(cfg.model, resolve=False),
              "data": OmegaConf.to_container(cfg.data, resolve=False), "weights": "ema"}
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    save_file({k: torch.randn_like(v) * 0.1 for k, v in WanDiT(**config["backbone"]).state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "model.safetensors"


def infer(out: Path, checkpoint: Path, *overrides: str) -> dict:
    return inference.run(compose_inference(f"checkpoint={checkpoint}", *overrides), out)


def crafted(export: Path, folder: Path, group: str, key: str, node: dict) -> Path:
    """A copy of `export` whose config.json has `group.key` replaced by `node`."""
    shutil.copytree(export.parent, folder)
    config = json.loads((folder / "config.json").read_text())
    config[group][key] = node
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "model.safetensors"


def unlink(victim: Path) -> dict:
    return {"_target_": "pathlib.Path.unlink", "self": str(victim)}


def system(victim: Path) -> dict:
    return {"_target_": "os.system", "_args_": [f"rm -f {shlex.quote(str(victim))}"]}


# attack -> (the group and key of config.json it replaces, the key path the error names, the bad node given
# a victim file, where that node sits in the replacement)
ATTACKS = {
    "unlink_as_text_encoder": ("model", "text_encoder", "model.text_encoder._target_", unlink, lambda bad: bad),
    "os_system_as_world": ("data", "world", "data.world._target_", system, lambda bad: bad),
    "nested_in_a_trusted_class": ("model", "vae", "model.vae.latent_channels._target_", unlink,
                                  lambda bad: {"_target_": "model.toy.vae.IdentityVAE", "latent_channels": bad}),
    "partial_in_args": ("model", "vae", "model.vae._args_[0]._target_", system,
                        lambda bad: {"_target_": "model.toy.vae.IdentityVAE", "_args_": [bad | {"_partial_": True}]}),
    "in_a_node_inference_never_builds": ("model", "teacher", "model.teacher.world._target_", unlink,
                                         lambda bad: {"_target_": "model.toy.teacher.ExactTeacher", "world": bad}),
    "made_by_an_interpolation": ("model", "vae", "model.vae._target_", unlink,  # a string until resolved
                                 lambda bad: f"${{oc.create:{{_target_: {bad['_target_']}, self: '{bad['self']}'}}}}"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_crafted_export_is_refused_and_the_victim_survives(export, tmp_path, attack):
    group, key, key_path, bad, place = ATTACKS[attack]
    victim, canary = tmp_path / "victim.txt", tmp_path / "canary.txt"
    victim.write_text("precious")
    canary.write_text("expendable")
    if bad is unlink:  # live: Hydra builds it and the file is gone (os.system: only Hydra >= 1.3.8 blocks it)
        instantiate(OmegaConf.create(bad(canary)))
        assert not canary.exists()
    target = bad(victim)["_target_"]
    checkpoint = crafted(export, tmp_path / "export", group, key, place(bad(victim)))
    out = tmp_path / "out"
    with pytest.raises(ValueError) as refused:
        infer(out, checkpoint, PROMPT)
    message = str(refused.value)
    assert message.startswith(f"{checkpoint.parent / 'config.json'}: {key_path}={target!r} is refused")
    assert "\n" not in message and "model.* / utils.data.*" in message
    assert victim.read_text() == "precious" and not out.exists()


@pytest.mark.parametrize("target, reason", [
    ("utils.data.Path", "it is pathlib.Path, defined outside the project's packages"),  # re-exported by a project module
    ("model.wan.text_encoder.prompt_clean", "not a class"),  # a project function
    ("model.nope.Missing", "not a class"),
    ("model.toy.vae.IdentityVAE; rm -rf x", "not a dotted class name"),
    ("${data.evil}", "not a dotted class name"),  # an interpolation is refused, not resolved
])
def test_only_classes_defined_in_the_project_pass(target, reason):
    with pytest.raises(ValueError, match=re.escape(f"config.json: data.prompts._target_={target!r} is refused ({reason}")):
        student.check_targets({"data": {"prompts": {"_target_": target}}}, "config.json")
    student.check_targets({"data": {"prompts": {"_target_": "utils.data.PromptFile"}},  # the project's own pass
                           "method": {"_target_": "model.dmd.DMD"}, "model": {"vae": {"_target_": "model.wan.vae.WanVAE"}}},
                          "config.json")


def test_genuine_export_still_loads(export, tmp_path):
    index = infer(tmp_path / "out", export, PROMPT)
    assert [i["file"] for i in index["items"]] == ["0000_a-red-circle-moving-left_seed0.mp4"]
    assert (tmp_path / "out" / index["items"][0]["file"]).stat().st_size > 0


def test_reused_output_dir_is_refused_then_overwritten(export, tmp_path):
    out = tmp_path / "out"
    first = infer(out, export, PROMPT, "seed=[0,1]", "save_latents=true")
    old = sorted(p.name for p in out.iterdir())
    assert len(old) == 5 and "index.json" in old  # 2 videos, 2 latents, the index
    before = {name: (out / name).read_bytes() for name in old}
    # things that are not the earlier run's: the user's notes, Hydra's folder, a file the index may not reach
    (out / "notes.txt").write_text("mine")
    (out / ".hydra").mkdir()
    (out / ".hydra" / "config.yaml").write_text("x: 1")
    (tmp_path / "outside.mp4").write_text("not in out")
    index = json.loads((out / "index.json").read_text())
    (tmp_path / "outside.latents.safetensors").write_text("not in out")
    crafted_entry = {"index": 9, "file": "../outside.mp4", "latents": str(tmp_path / "outside.latents.safetensors")}
    index["items"].append(crafted_entry)  # names outside out: never removed
    (out / "index.json").write_text(json.dumps(index))
    stray = out / "0007_a-blue-square-moving-up_seed3.mp4"  # an interrupted run's video, not in the index
    stray.write_text("old")
    with pytest.raises(ValueError) as refused:
        infer(out, export, PROMPT, "seed=[0,1]")
    message = str(refused.value)
    assert message.startswith(f"output_dir={out} already holds an earlier inference (6 files: ")
    assert "overwrite=true" in message and "\n" not in message
    assert all((out / name).read_bytes() == data for name, data in before.items() if name != "index.json")
    # overwrite=true, but bad input: stops before removing anything
    with pytest.raises(ValueError, match="unknown word 'purple'"):
        infer(out, export, "prompts=[a purple circle moving left]", "overwrite=true")
    assert stray.exists() and all((out / name).exists() for name in old)
    second = infer(out, export, "prompts=[a blue square moving up]", "seed=[2]", "overwrite=true")
    new = [i["file"] for i in second["items"]]
    assert new == ["0000_a-blue-square-moving-up_seed2.mp4"] and [i["file"] for i in first["items"]] != new
    assert sorted(p.name for p in out.iterdir()) == sorted([*new, "index.json", "notes.txt", ".hydra"])
    assert json.loads((out / "index.json").read_text())["items"] == second["items"]
    assert (out / ".hydra" / "config.yaml").exists() and (out / "notes.txt").read_text() == "mine"
    assert (tmp_path / "outside.mp4").exists() and (tmp_path / "outside.latents.safetensors").exists()
