"""DMD2 and f-distill on Wan through the real loaders: the tiny random Wan folder on the CPU (the
discriminator head on WanDiT's hidden states, real clips from latent shards, one step of each phase
through scripts/bench_train.py), and at Wan2.1-1.3B size on a GPU (step time and peak memory against
plain DMD: the numbers the issue asks for)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts import bench_train
from tests.test_wan_training import H, W, wan_overrides
from tests.wan_folder import Z_DIM, tiny_wan_folder  # noqa: F401  (session fixture)

REPO = Path(__file__).resolve().parents[1]


def bench_json(capsys, argv) -> dict:
    bench_train.main(argv)
    out = capsys.readouterr().out
    return json.loads(out[out.index("{\n"):])


def data_args(preset: str, prompts: Path, clips: int) -> list[str]:
    """What each preset trains on in the benchmark: DMD its prompt file, DMD2 and f-distill (whose presets take
    data=latents) random latent clips, whose captions are also their generator's prompts."""
    if preset == "self_forcing_dmd":
        return [f"data.prompts.path={prompts}"]
    return ["--random-latents", str(clips), "data=latents"]  # the flag before the Hydra overrides: argparse's order


def write_prompts(folder: Path) -> Path:
    path = folder / "prompts.txt"
    path.write_text("\n".join(f"a red ball rolls past a tree, take {i}" for i in range(8)) + "\n")
    return path


@pytest.mark.parametrize("preset", ["self_forcing_dmd", "dmd2_gan", "fdistill_js"])
def test_one_step_of_each_phase_on_the_tiny_wan_folder(tiny_wan_folder, capsys, tmp_path, preset):
    extra = ["method.gan.blocks=[0,1]"] if preset != "self_forcing_dmd" else []
    overrides = [o for o in wan_overrides(tiny_wan_folder, "model.text_encoder.text_len=16", *extra, preset=preset)
                 if not o.startswith(("max_steps", "checkpoint", "eval", "total_batch_size"))]
    result = bench_json(capsys, ["--steps", "1", "--warmup", "0", *data_args(preset, write_prompts(tmp_path), 2), *overrides])
    assert result["generator_step_s"] > 0 and result["critic_step_s"] > 0
    assert result["tokens_per_clip"] == 2 * (H // 2) * (W // 2)


def test_random_latents_need_the_latents_data_group(tiny_wan_folder):
    overrides = [o for o in wan_overrides(tiny_wan_folder, "data.prompts.path=/nonexistent", preset="self_forcing_dmd")
                 if not o.startswith("total_batch_size")]
    with pytest.raises(SystemExit, match="add data=latents"):
        bench_train.main(["--random-latents", "2", *overrides])


@pytest.mark.gpu
def test_gan_and_fdistill_steps_at_wan_size_against_dmd(tmp_path):
    """One H200 / H100, random Wan2.1-1.3B weights, bf16, 21 latent frames at 832x480: generator and critic
    step times (mean over exit steps 0-3) and peak memory of DMD, DMD2 and f-distill (JS), each preset as
    it is, with random latent clips as DMD2's and f-distill's real data (their captions their prompts) and a prompt file
    for DMD."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    folder = tmp_path / "wan-1.3b-random"
    subprocess.run([sys.executable, "scripts/make_random_wan_folder.py", str(folder)], cwd=REPO, check=True)
    prompts, rows = write_prompts(tmp_path), {}
    for preset in ("self_forcing_dmd", "dmd2_gan", "fdistill_js"):
        out = tmp_path / f"{preset}.json"
        subprocess.run([sys.executable, "scripts/bench_train.py", "--steps", "4", "--warmup", "4", "--exit-steps", "0,1,2,3",
                        "--out", str(out), *data_args(preset, prompts, 8), f"experiment={preset}", f"model.path={folder}"],
                       cwd=REPO, check=True)
        r = json.loads(out.read_text())
        rows[preset] = (r["generator_step_s_mean_over_exit_steps"], r["critic_step_s_mean_over_exit_steps"],
                        r["peak_allocated_gib_per_gpu"][0])
    print(f"\n{torch.cuda.get_device_name()}: generator s / critic s / peak allocated GiB")
    for preset, (g, c, peak) in rows.items():
        base = rows["self_forcing_dmd"]
        print(f"{preset:18s} {g:.2f} ({g / base[0]:.2f}x)  {c:.2f} ({c / base[1]:.2f}x)  {peak:.1f}")
    assert all(peak < 139 for _, _, peak in rows.values())
