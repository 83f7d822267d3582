"""Stream videos from a trained student: one mp4 per (prompt, seed) and an index.json (an image student: one png
each). Hydra entry point.

    python inference.py checkpoint=outputs/2025-01-01/12-00-00          # a run's latest step, toy prompts
    python inference.py checkpoint=<run dir> prompts=prompts.txt seed=[0,1] num_frames=36
    python inference.py checkpoint=self_forcing_dmd.pt model=wan2.1_t2v_1.3b prompts=prompts.txt
    python inference.py checkpoint=<run dir> prompts=story.yaml duration=60      # a timeline: one long video, prompts switched
    python inference.py checkpoint=<run dir> prompts="[the car drives on]" init_video=clip.mp4   # continue a video
    torchrun --nproc_per_node=8 inference.py checkpoint=<run dir> prompts=prompts.txt   # items split over GPUs
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from utils.distributed import log0
from utils.errors import one_line_errors
from engine.inference import run
from engine.student import group_overrides


@hydra.main(config_path="configs", config_name="inference", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    # expected errors (a bad checkpoint path, prompt or key) end in one line; HYDRA_FULL_ERROR=1 for the traceback
    with one_line_errors(Path(hydra_cfg.runtime.output_dir), hint="HYDRA_FULL_ERROR=1"):
        index = run(cfg, cfg.output_dir or hydra_cfg.runtime.output_dir, group_overrides(hydra_cfg.overrides.task))
    if not index:  # ranks other than 0
        return
    log0("%d %s in %s (index.json)", len(index["items"]), "images" if index.get("format") == "png" else "videos",
         index["output_dir"])
    log0("throughput %.2f frames/s, first-chunk latency %.3f s (%s)", index["throughput_fps"],
         index["first_chunk_latency_s"], index["timing"]["device"])
    if "toy_metrics" in index:
        toy = index["toy_metrics"]
        log0("toy world: match rate %.3f, coverage %.3f, mean distance %.4f", toy["match_rate"], toy["coverage"],
             toy["mean_distance"])


if __name__ == "__main__":
    main()
