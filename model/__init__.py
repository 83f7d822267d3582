"""Methods (one file each) and the networks they train: the Wan DiT and VAE wrappers, the toy world."""

import utils  # noqa: F401  (quiets torchao's import-time notices before diffusers imports it)
