"""Wan weights load from every format users have, convert both ways exactly, and fail loudly."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.wan.transformer import WanDiT
from model.wan.weights import (
    WeightMismatchError,
    diffusers_to_wan,
    load_backbone,
    read_state_dict,
    wan_to_diffusers,
)
from scripts.convert_checkpoint import convert
from tests.wan_tiny import TINY, tiny_diffusers

# Names of the original Wan2.1 release (Wan-AI), for one block and the model-level modules.
WAN_KEYS = {
    "patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.bias", "time_embedding.0.weight",
    "time_embedding.2.bias", "time_projection.1.weight", "head.head.weight", "head.modulation",
    "blocks.1.self_attn.q.weight", "blocks.1.self_attn.o.bias", "blocks.1.self_attn.norm_k.weight",
    "blocks.1.cross_attn.k.weight", "blocks.1.cross_attn.norm_q.weight", "blocks.1.norm3.weight",
    "blocks.1.norm3.bias", "blocks.1.ffn.0.weight", "blocks.1.ffn.2.bias", "blocks.1.modulation",
}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference():
    return tiny_diffusers(seed=5)


def test_key_conversion_round_trips_exactly(reference):
    hf = reference.state_dict()
    wan = diffusers_to_wan(hf)
    assert WAN_KEYS <= wan.keys()
    assert not any("attn1" in k or "condition_embedder" in k or "norm2" in k for k in wan)
    # the cross-attention norm is norm3 in Wan and norm2 in diffusers: the same tensor
    assert torch.equal(wan["blocks.1.norm3.weight"], hf["blocks.1.norm2.weight"])
    assert torch.equal(wan["head.modulation"], hf["scale_shift_table"])
    assert torch.equal(wan["blocks.0.modulation"], hf["blocks.0.scale_shift_table"])
    assert_same(wan_to_diffusers(wan), hf)
    assert len(wan) == len(hf) == sum(1 for _ in reference.state_dict())


def test_diffusers_folder_loads_sharded_with_from_pretrained(tmp_path, reference):
    reference.save_pretrained(tmp_path / "transformer", max_shard_size="20KB")
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
    model = WanDiT.from_pretrained(tmp_path, subfolder="transformer")
    assert type(model.blocks[0]).__name__ == "WanDiTBlock"
    assert_same(model.state_dict(), reference.state_dict())
    assert_same(load_backbone(tmp_path).state_dict(), reference.state_dict())


def test_self_forcing_checkpoint_loads(tmp_path, reference):
    wan = diffusers_to_wan(reference.state_dict())
    other = tiny_diffusers(seed=6)
    checkpoint = {
        "generator": {f"model.{k}": v for k, v in diffusers_to_wan(other.state_dict()).items()},
        "generator_ema": {f"model.{k}": v for k, v in wan.items()},
        "critic": {f"model.{k}": v * 0 for k, v in wan.items()},
    }
    torch.save(checkpoint, tmp_path / "sf.pt")
    config = dict(TINY)
    ema = load_backbone(tmp_path / "sf.pt", config)  # generator_ema by default
    assert_same(ema.state_dict(), reference.state_dict())
    gen = load_backbone(tmp_path / "sf.pt", config, key="generator")
    assert_same(gen.state_dict(), other.state_dict())
    with pytest.raises(KeyError, match="holds \\['generator_ema', 'generator', 'critic'\\], not 'teacher'"):
        read_state_dict(tmp_path / "sf.pt", key="teacher")
    # FSDP1 / checkpoint-wrapper names, as some Self-Forcing forks save them
    wrapped = {f"model._fsdp_wrapped_module.{k}".replace("blocks.", "blocks._checkpoint_wrapped_module.", 0): v for k, v in wan.items()}
    torch.save({"generator": wrapped}, tmp_path / "wrapped.pt")
    assert_same(load_backbone(tmp_path / "wrapped.pt", config).state_dict(), reference.state_dict())


def test_original_wan_safetensors_loads(tmp_path, reference):
    save_file({k: v.contiguous() for k, v in diffusers_to_wan(reference.state_dict()).items()}, tmp_path / "wan.safetensors")
    model = load_backbone(tmp_path / "wan.safetensors", dict(TINY))
    assert_same(model.state_dict(), reference.state_dict())


def test_converter_script_both_directions(tmp_path, reference):
    reference.save_pretrained(tmp_path / "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "wan.safetensors"), "wan")
    wan = load_file(tmp_path / "wan.safetensors")
    assert WAN_KEYS <= wan.keys()
    convert(str(tmp_path / "wan.safetensors"), str(tmp_path / "back"), "diffusers", config=str(tmp_path / "hf"))
    assert_same(WanDiT.from_pretrained(tmp_path / "back").state_dict(), reference.state_dict())
    convert(str(tmp_path / "back"), str(tmp_path / "sf.pt"), "self_forcing", key="generator_ema")
    sf = torch.load(tmp_path / "sf.pt", weights_only=True)
    assert list(sf) == ["generator_ema"] and all(k.startswith("model.") for k in sf["generator_ema"])
    assert_same(load_backbone(tmp_path / "sf.pt", tmp_path / "hf").state_dict(), reference.state_dict())
    assert not list(tmp_path.glob("*.tmp"))


def test_wrong_keys_stop_with_counts_and_names(tmp_path, reference):
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    del state["blocks.0.attn1.to_q.weight"], state["proj_out.bias"]
    state["blocks.0.attn1.extra.weight"] = torch.zeros(1)
    state["blocks.1.ffn.net.2.bias"] = torch.zeros(3)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(WeightMismatchError) as err:
        load_backbone(tmp_path / "bad.safetensors", dict(TINY))
    message = str(err.value)
    assert "2 missing: blocks.0.attn1.to_q.weight, proj_out.bias" in message
    assert "1 unexpected: blocks.0.attn1.extra.weight" in message
    assert "1 wrong shape: blocks.1.ffn.net.2.bias: (3,) vs model (24,)" in message
    # diffusers' own loader, made strict (a wrong shape is diffusers' own error there)
    del state["blocks.1.ffn.net.2.bias"]
    folder = tmp_path / "folder"
    reference.save_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightMismatchError, match="3 missing: blocks.0.attn1.to_q.weight, blocks.1.ffn.net.2.bias, proj_out.bias"):
        WanDiT.from_pretrained(folder)
    with pytest.raises(WeightMismatchError, match="cannot tell the checkpoint format"):
        save_file({"foo.weight": torch.zeros(1)}, tmp_path / "foo.safetensors")
        read_state_dict(tmp_path / "foo.safetensors")
    with pytest.raises(ValueError, match="carries no model config"):
        load_backbone(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_backbone(tmp_path / "missing.pt", dict(TINY))
    json.loads((folder / "config.json").read_text())  # the folder stayed a valid config
