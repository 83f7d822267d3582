"""Training data of the toy world: prompts for self forcing, prompt + clip for CausVid-style runs.

Both are map-style datasets that depend only on (seed, index), so a resumed run or another rank
reads exactly the same item for the same index. Each block of P consecutive indices holds every
one of the P prompts once, in a seeded order, so prompts stay balanced at any batch size.
"""

import torch
from torch.utils.data import Dataset

from model.toy.world import ToyWorld


def _generator(seed: int, index: int) -> torch.Generator:
    # One independent stream per (seed, index): random access without replaying earlier draws.
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


class ToyPromptDataset(Dataset):
    """`num_samples` prompt strings of the toy world, deterministic given `seed`."""

    def __init__(self, world: ToyWorld, num_samples: int = 4800, seed: int = 0):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.world, self.num_samples, self.seed = world, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def prompt_id(self, index: int) -> int:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        block, pos = divmod(index, len(self.world.prompts))
        order = torch.randperm(len(self.world.prompts), generator=_generator(self.seed, -1 - block))
        return int(order[pos])

    def __getitem__(self, index: int) -> str:
        return self.world.prompts[self.prompt_id(index)]


class ToyVideoDataset(ToyPromptDataset):
    """Items {"prompts": str, "video": [F, C, H, W]}: a prompt and one of its templates, uniformly.

    "prompts" is the reference's batch key; the default collate turns it into a list of strings.
    """

    def __init__(self, world: ToyWorld, num_samples: int = 4800, seed: int = 0,
                 num_frames: int | None = None):
        super().__init__(world, num_samples, seed)
        self.num_frames = num_frames or world.num_frames

    def __getitem__(self, index: int) -> dict:
        p = self.prompt_id(index)
        k = int(torch.randint(self.world.templates_per_prompt, (), generator=_generator(self.seed, index)))
        videos, _ = self.world.all_templates(self.num_frames)
        clip = videos[p * self.world.templates_per_prompt + k].clone()
        return {"prompts": self.world.prompts[p], "video": clip}
