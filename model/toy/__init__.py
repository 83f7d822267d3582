"""The embedded toy world: known data, an exact teacher, a tiny text encoder and an identity VAE."""

from model.toy.datasets import ToyPromptDataset, ToyVideoDataset
from model.toy.teacher import ExactTeacher
from model.toy.text_encoder import ToyTextEncoder
from model.toy.vae import IdentityVAE
from model.toy.world import PROMPTS, VOCABULARY, ToyWorld

__all__ = ["ExactTeacher", "IdentityVAE", "PROMPTS", "ToyPromptDataset", "ToyTextEncoder",
           "ToyVideoDataset", "ToyWorld", "VOCABULARY"]
