"""Compose the training config at tiny size, as a user would with Hydra overrides."""

from pathlib import Path

from hydra import compose, initialize_config_dir

import engine.config  # noqa: F401  (registers the schema)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TINY = [
    "data.world.height=8", "data.world.width=8", "data.world.num_frames=6", "data.world.radius=1.5",
    "data.world.lanes=2", "data.world.phases=1", "data.metrics.samples_per_prompt=1",
    "data.metrics.long_num_frames=8", "method.num_training_frames=6", "method.num_frame_per_block=2",
    "model.backbone.num_layers=2", "model.backbone.num_attention_heads=2", "model.backbone.attention_head_dim=8",
    "model.backbone.ffn_dim=32", "model.backbone.freq_dim=16", "batch_size=2", "max_steps=2",
    "dfake_gen_update_ratio=2", "ema_start_step=1", "eval.every=0", "eval.at_start=false",
    "checkpoint.every=1", "checkpoint.keep=0", "device=cpu",
    "model.generator_init=null", "model.critic_init=generator",  # the shipped toy inits are full size
]


def compose_config(*overrides: str, tiny: bool = True):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=(TINY if tiny else []) + list(overrides))
