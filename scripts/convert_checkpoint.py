"""Convert Wan transformer checkpoints between diffusers, original Wan and Self-Forcing formats.

Examples:
  # Self-Forcing .pt (EMA generator) -> diffusers folder (needs the model config)
  python scripts/convert_checkpoint.py self_forcing_dmd.pt out/transformer --to diffusers \
      --key generator_ema --config Wan2.1-T2V-1.3B-Diffusers
  # diffusers folder -> original Wan names, one safetensors file
  python scripts/convert_checkpoint.py Wan2.1-T2V-1.3B-Diffusers wan_1.3b.safetensors --to wan
  # diffusers folder -> a Self-Forcing-style .pt holding `generator`
  python scripts/convert_checkpoint.py run/export out.pt --to self_forcing --key generator
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.wan.weights import diffusers_to_wan, load_backbone, read_state_dict  # noqa: E402


def _atomic_save(write, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    write(tmp)
    os.replace(tmp, dst)


def convert(src: str, dst: str, to: str, key: str | None = None, config: str | None = None) -> Path:
    dst_path = Path(dst)
    if to == "diffusers" and dst_path.suffix != ".safetensors":
        # a loadable folder: config.json + safetensors, checked strictly on the way
        model = load_backbone(src, config, key=key)
        model.save_pretrained(dst_path)
        return dst_path
    state = read_state_dict(src, key)  # diffusers names, checked for format
    if config is not None or Path(src).is_dir():
        # check every key against the model before writing anything
        load_backbone(src, config, key=key)
    state = {k: v.contiguous() for k, v in state.items()}
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    if to == "wan":
        state = diffusers_to_wan(state)
    if to == "self_forcing":
        wrapped = {f"model.{k}": v for k, v in diffusers_to_wan(state).items()}
        _atomic_save(lambda p: torch.save({key or "generator": wrapped}, p), dst_path)
    else:
        from safetensors.torch import save_file

        _atomic_save(lambda p: save_file(state, str(p), metadata={"format": "pt"}), dst_path)
    return dst_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="diffusers folder, .safetensors (diffusers or Wan names) or .pt (Self-Forcing)")
    parser.add_argument("dst", help="output folder (diffusers) or file (.safetensors / .pt)")
    parser.add_argument("--to", choices=("diffusers", "wan", "self_forcing"), required=True)
    parser.add_argument("--key", help="network in a Self-Forcing checkpoint: generator_ema, generator or critic")
    parser.add_argument("--config", help="model config (config.json or diffusers folder) for files without one")
    args = parser.parse_args(argv)
    print(convert(args.src, args.dst, args.to, args.key, args.config))


if __name__ == "__main__":
    main()
