"""Wan's text encoder and VAE wrappers on a tiny random diffusers-format folder.

The key test: streaming decode, chunk by chunk with the causal feature cache carried across calls,
equals diffusers' whole-clip decode exactly.
"""

import shutil
from types import SimpleNamespace

import diffusers
import pytest
import torch
from diffusers.pipelines.wan.pipeline_wan import WanPipeline
from transformers import AutoTokenizer, UMT5EncoderModel

from model.wan.folder import check_wan_folder
from model.wan.text_encoder import WanTextEncoder
from model.wan.vae import DIFFUSERS_SUPPORTED, WanVAE, check_decoder_internals, check_diffusers_version
from tests.wan_folder import TEXT_DIM, VAE, Z_DIM, tiny_wan_folder  # noqa: F401 (fixture)

TEXT_LEN = 12
PROMPTS = ["a red circle moving left", "  the blue &amp; square\n\n moving   up zzz ", ""]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def vae(tiny_wan_folder):
    return WanVAE(str(tiny_wan_folder), dtype="float32")


# ---------------------------------------------------------------- text encoder
def test_text_encoder_matches_manual_umt5_and_diffusers(tiny_wan_folder):
    enc = WanTextEncoder(str(tiny_wan_folder), text_len=TEXT_LEN, dtype="float32")
    enc.train()  # a parent's .train() must not switch UMT5's dropout on
    out = enc(PROMPTS)
    embeds, mask = out["prompt_embeds"], out["attention_mask"]
    assert embeds.shape == (3, TEXT_LEN, TEXT_DIM) and embeds.dtype == torch.float32
    assert mask.dtype == torch.bool and not any(p.requires_grad for p in enc.parameters())

    # Manual run: cleaned prompts, </s> appended, right-padded with <pad> (id 0).
    tok = AutoTokenizer.from_pretrained(tiny_wan_folder / "tokenizer")
    umt5 = UMT5EncoderModel.from_pretrained(tiny_wan_folder / "text_encoder", dtype=torch.float32).eval()
    cleaned = ["a red circle moving left", "the blue & square moving up zzz", ""]
    ids = tok(cleaned, padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt")
    assert ids.attention_mask.sum(1).tolist() == [6, 8, 1]  # words + </s>; "&" and "zzz" are <unk>
    assert mask.sum(1).tolist() == [6, 8, 1] and torch.equal(mask, ids.attention_mask.bool())
    with torch.no_grad():
        ref = umt5(ids.input_ids, ids.attention_mask).last_hidden_state
    assert torch.equal(embeds[mask], ref[mask.bool()])
    assert torch.equal(embeds[~mask], torch.zeros_like(embeds[~mask]))  # exactly zero past the length
    assert ref[~mask].abs().min() > 0  # ... where UMT5 itself is not

    # diffusers' WanPipeline on the same parts gives the same numbers.
    pipe = SimpleNamespace(tokenizer=tok, text_encoder=umt5, _execution_device=torch.device("cpu"))
    with torch.no_grad():
        diffusers_embeds = WanPipeline._get_t5_prompt_embeds(pipe, PROMPTS, max_sequence_length=TEXT_LEN)
    assert torch.equal(embeds, diffusers_embeds)


# ---------------------------------------------------------------- VAE
def test_vae_shapes_and_normalisation(vae):
    assert (vae.latent_channels, vae.temporal_compression, vae.spatial_compression) == (Z_DIM, 4, 8)
    gen = torch.Generator().manual_seed(0)
    for frames in (1, 5, 9):  # F = 1 + 4k pixel frames -> 1 + k latent frames
        video = torch.rand(2, frames, 3, 16, 24, generator=gen) * 2 - 1
        latents = vae.encode(video)
        assert latents.shape == (2, 1 + (frames - 1) // 4, Z_DIM, 2, 3)
        decoded = vae.decode(latents)
        assert decoded.shape == video.shape and decoded.abs().max() <= 1

    # encode == (posterior mode - mean) / std, per channel, with diffusers' [B, C, F, H, W] layout.
    with torch.no_grad():
        mode = vae.model.encode(video.transpose(1, 2)).latent_dist.mode().transpose(1, 2)
    mean = torch.tensor(VAE["latents_mean"]).view(1, 1, Z_DIM, 1, 1)
    std = torch.tensor(VAE["latents_std"]).view(1, 1, Z_DIM, 1, 1)
    assert torch.equal(latents, (mode - mean) * (1 / std))  # Wan / Self-Forcing's exact ops
    torch.testing.assert_close(latents, (mode - mean) / std, rtol=1e-6, atol=1e-6)
    # decode undoes it as WanPipeline does: latents / (1 / std) + mean, then diffusers' decode.
    with torch.no_grad():
        ref = vae.model.decode((latents / (1 / std) + mean).transpose(1, 2)).sample.transpose(1, 2)
    assert torch.equal(decoded, ref)

    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        vae.encode(torch.zeros(1, 4, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, F, 4, H, W\]"):
        vae.decode(torch.zeros(1, 4, 2, 2, 2))  # [B, C, F, H, W] by mistake


# The streamed and the whole-clip decode do the same arithmetic on different clip lengths, and the CPU's
# convolution kernels (oneDNN) choose their blocking, hence the order of each sum, by shape and by the
# instruction set (AVX2 or AVX-512): results agree to float32 rounding, not bit for bit. Each of the
# decoder's ~10 convolutions may round its sums differently by a few ulps (float32 eps 1.2e-7) at the
# activations' scale (|x| <= ~4 here), which compounds to a few 1e-6 at the output (|x| <= 1); 1e-5
# bounds that, while a streaming defect (a wrong or missing cached frame) errs by 1e-2 or more. Bit equality is asserted where the arithmetic
# is the same: the same chunks decoded twice.
DECODE_ATOL = 1e-5


@pytest.mark.parametrize("split", [[1] * 7, [3, 3, 1], [1, 3, 3], [2, 1, 4]], ids=lambda s: "-".join(map(str, s)))
def test_streaming_decode_equals_whole_clip(vae, split):
    latents = torch.randn(2, sum(split), Z_DIM, 2, 3, generator=torch.Generator().manual_seed(1))
    whole = vae.decode(latents)
    assert whole.shape == (2, 1 + 4 * (sum(split) - 1), 3, 16, 24)
    assert 0.05 < whole.std() and (whole.abs() < 1).float().mean() > 0.9  # not saturated by the clamp

    stream = vae.stream_decoder(batch_size=2)
    chunks, start = [], 0
    for size in split:
        chunks.append(stream.decode(latents[:, start : start + size]))
        expected = size * 4 - 3 if start == 0 else size * 4  # the first latent frame gives 1 pixel frame
        assert chunks[-1].shape[1] == expected
        start += size
    streamed = torch.cat(chunks, dim=1)
    assert (streamed - whole).abs().max().item() <= DECODE_ATOL

    # The cache is the stream's own: a whole-clip decode in between does not disturb it, and
    # reset() starts a new clip: the same chunks give the same bits again.
    stream.reset()
    first = stream.decode(latents[:, :1])
    vae.decode(latents)
    again = torch.cat([first, stream.decode(latents[:, 1:])], dim=1)
    assert (again - whole).abs().max().item() <= DECODE_ATOL
    stream.reset()
    assert torch.equal(torch.cat([stream.decode(latents[:, a:a + n]) for a, n in zip([0, *torch.tensor(split).cumsum(0)[:-1].tolist()], split)], dim=1), streamed)


def test_streaming_decode_wan22_style_vae(tmp_path):
    """Wan2.2's VAE (residual up blocks that drop frames on the first chunk, 2x2 patchify): the
    stream must pass first_chunk on latent frame 0 only and unpatchify per chunk."""
    torch.manual_seed(0)
    config = dict(VAE, is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16)
    diffusers.AutoencoderKLWan(**config).save_pretrained(tmp_path / "vae")
    vae22 = WanVAE(str(tmp_path), dtype="float32")
    assert (vae22.temporal_compression, vae22.spatial_compression) == (4, 16)
    assert vae22.encode(torch.zeros(1, 5, 3, 32, 64)).shape == (1, 2, Z_DIM, 2, 4)
    latents = torch.randn(1, 7, Z_DIM, 2, 2, generator=torch.Generator().manual_seed(2))
    whole = vae22.decode(latents)
    assert whole.shape == (1, 25, 3, 32, 32)
    stream = vae22.stream_decoder(batch_size=1)
    streamed = torch.cat([stream.decode(latents[:, a:b]) for a, b in ((0, 1), (1, 4), (4, 7))], dim=1)
    assert (streamed - whole).abs().max().item() <= DECODE_ATOL


def test_streaming_decode_rejects_wrong_batch(vae):
    with pytest.raises(ValueError, match="B=2"):
        vae.stream_decoder(2).decode(torch.zeros(1, 1, Z_DIM, 2, 2))


# ---------------------------------------------------------------- guards and errors
def test_diffusers_version_guard(tiny_wan_folder, monkeypatch):
    check_diffusers_version()  # the installed one is supported
    for bad in ("0.34.0", "0.43.0", "0.43.0.dev0"):
        with pytest.raises(RuntimeError, match=f"diffusers {bad} is installed") as err:
            check_diffusers_version(bad)
        assert DIFFUSERS_SUPPORTED in str(err.value)
    check_diffusers_version("0.42.0.dev0")
    monkeypatch.setattr(diffusers, "__version__", "0.30.0")
    with pytest.raises(RuntimeError, match="diffusers 0.30.0 is installed"):
        WanVAE(str(tiny_wan_folder), dtype="float32")


def test_decoder_internals_guard(vae, monkeypatch):
    check_decoder_internals(vae.model)
    monkeypatch.setattr(vae.model.decoder, "forward", lambda x, feat_cache=None, feat_idx=[0]: x)
    with pytest.raises(RuntimeError, match=r"WanDecoder3d.forward\(first_chunk=\)"):
        check_decoder_internals(vae.model)


@pytest.mark.parametrize(
    "part, delete, named",
    [("vae", "diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model*.safetensors"),
     ("tokenizer", "tokenizer.json", "tokenizer/tokenizer.json or tokenizer/spiece.model"),
     ("text_encoder", "config.json", "text_encoder/config.json"),
     ("text_encoder", None, "text_encoder/ (the whole sub-folder)")],
)
def test_missing_files_are_named(tiny_wan_folder, tmp_path, part, delete, named):
    folder = shutil.copytree(tiny_wan_folder, tmp_path / "wan")
    if delete is None:
        shutil.rmtree(folder / part)
    else:
        (folder / part / delete).unlink()
    build = WanVAE if part == "vae" else WanTextEncoder
    with pytest.raises(FileNotFoundError) as err:
        build(str(folder), dtype="float32")
    message = str(err.value)
    assert f"Wan folder {folder} is missing {named}" in message
    for line in ("transformer/   config.json, diffusion_pytorch_model*.safetensors",
                 "tokenizer/     tokenizer_config.json and tokenizer.json or spiece.model"):
        assert line in message  # the expected layout


def test_missing_shard_and_folder_are_named(tiny_wan_folder, tmp_path):
    folder = shutil.copytree(tiny_wan_folder, tmp_path / "wan")
    check_wan_folder(folder)
    index = '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model.safetensors"}}'
    (folder / "text_encoder" / "model.safetensors.index.json").write_text(index)
    with pytest.raises(FileNotFoundError, match="text_encoder/model-00001-of-00002.safetensors"):
        check_wan_folder(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_wan_folder(tmp_path / "nowhere", parts=("vae",))


def test_auto_attention_backend_is_cudnn_only_where_it_runs():
    from model.wan.attention import resolve_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("auto", cuda, torch.bfloat16) == "cudnn"
    assert resolve_backend("auto", cuda, torch.float16) == "cudnn"
    assert resolve_backend("auto", cuda, torch.float32) == "sdpa"  # cuDNN attention has no fp32 kernel
    assert resolve_backend("auto", cpu, torch.bfloat16) == "sdpa"
    assert resolve_backend("flash_attn", cpu, torch.float32) == "flash_attn"  # a named backend is kept (and checked later)
