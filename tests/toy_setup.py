"""A toy-world distillation setup for tests: exact teacher, tiny Wan generator and critic."""

import torch

from model.base import MethodConfig
from model.toy import ExactTeacher, IdentityVAE, ToyTextEncoder, ToyWorld
from model.wan.transformer import WanDiT
from tests.wan_tiny import TINY, randomize

TOY_WAN = {**TINY, "in_channels": 3, "out_channels": 3, "text_dim": 32}


def toy_parts(seed: int = 0, num_frames: int = 6, height: int = 8, width: int = 8):
    world = ToyWorld(height=height, width=width, num_frames=num_frames, radius=1.5, speed=0.75)
    text = ToyTextEncoder(text_len=8, text_dim=32)
    teacher = ExactTeacher(world, text)
    generator = randomize(WanDiT(**TOY_WAN), seed)
    critic = randomize(WanDiT(**TOY_WAN), seed + 1)
    return world, text, teacher, generator, critic, IdentityVAE(3)


def toy_method(cls, cfg_cls=MethodConfig, seed: int = 0, **cfg):
    world, text, teacher, generator, critic, vae = toy_parts(seed)
    defaults = dict(num_frame_per_block=2, num_training_frames=world.num_frames, guidance_scale=1.0)
    config = cfg_cls(**{**defaults, **cfg})
    model = cls(generator, teacher, critic, text, vae, config, (3, world.height, world.width))
    model.reseed(seed, 0, "test", [0, 1])  # draws for a batch of two
    return model, world
