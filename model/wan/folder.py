"""Check a diffusers-format Wan folder before loading it, so a missing file is named up front.

Without this, a missing shard or tokenizer file surfaces deep inside transformers / diffusers as
an error about a repo id on the Hub, which says nothing about the folder the user gave.
"""

from __future__ import annotations

import json
from pathlib import Path

# Each part: requirements, each satisfied by any one of its glob alternatives.
_REQUIRED = {
    "transformer": (("config.json",), ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")),
    "vae": (("config.json",), ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")),
    "text_encoder": (("config.json",), ("model*.safetensors", "pytorch_model*.bin")),
    "tokenizer": (("tokenizer_config.json",), ("tokenizer.json", "spiece.model")),
}

LAYOUT = """\
Expected a diffusers-format Wan2.1 folder, laid out as Wan-AI/Wan2.1-T2V-1.3B-Diffusers is:
  <folder>/
    transformer/   config.json, diffusion_pytorch_model*.safetensors (+ .safetensors.index.json if sharded)
    vae/           config.json, diffusion_pytorch_model.safetensors
    text_encoder/  config.json, model*.safetensors (+ model.safetensors.index.json if sharded)
    tokenizer/     tokenizer_config.json and tokenizer.json or spiece.model (+ special_tokens_map.json)
Download it with: huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir <folder>"""


def _missing(folder: Path, part: str) -> str | None:
    """The first missing file of one part, as a path relative to the Wan folder, or None."""
    sub = folder / part
    if not sub.is_dir():
        return f"{part}/ (the whole sub-folder)"
    for alternatives in _REQUIRED[part]:
        if not any(any(sub.glob(pattern)) for pattern in alternatives):
            return " or ".join(f"{part}/{a}" for a in alternatives)
    # A sharded checkpoint lists its shards in an index; a lost shard would otherwise load as
    # "missing keys" (or silently stay randomly initialised).
    for index in sorted(sub.glob("*.index.json")):
        for shard in sorted(set(json.loads(index.read_text()).get("weight_map", {}).values())):
            if not (sub / shard).is_file():
                return f"{part}/{shard} (listed in {index.name})"
    return None


def check_wan_folder(path, parts=("transformer", "vae", "text_encoder", "tokenizer")) -> Path:
    """Raise FileNotFoundError naming the folder and the missing file unless `parts` are all present."""
    unknown = [p for p in parts if p not in _REQUIRED]
    if unknown:
        raise ValueError(f"unknown Wan folder part(s) {unknown}; known: {list(_REQUIRED)}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"Wan folder {folder} does not exist or is not a directory.\n{LAYOUT}")
    for part in parts:
        missing = _missing(folder, part)
        if missing is not None:
            raise FileNotFoundError(f"Wan folder {folder} is missing {missing}.\n{LAYOUT}")
    return folder
