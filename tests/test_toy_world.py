"""The toy world: its data, the exact teacher, the text encoder, the VAE and the config files."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from model.toy import (VOCABULARY, ExactTeacher, IdentityVAE, ToyPromptDataset, ToyTextEncoder,
                       ToyVideoDataset, ToyWorld)
from model.toy.world import BACKGROUND, COLOURS, DIRECTIONS
from utils.toy_metrics import evaluate, match_radii, pairwise_distance, sample_teacher

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def world():
    return ToyWorld()


@pytest.fixture(scope="module")
def encoder():
    return ToyTextEncoder()


@pytest.fixture(scope="module")
def teacher(world, encoder):
    return ExactTeacher(world, encoder)


def test_grammar_and_template_shapes(world):
    assert len(world.prompts) == len(set(world.prompts)) == 48
    k = world.templates_per_prompt
    t = world.templates("a red circle moving left", 20)
    assert tuple(t.shape) == (k, 20, 3, 16, 16) and t.dtype == torch.float32
    videos, ids = world.all_templates()
    assert tuple(videos.shape) == (48 * k, 12, 3, 16, 16) and len(videos) <= 400
    assert videos.min() >= -1 and videos.max() <= 1
    assert torch.equal(ids, torch.arange(48).repeat_interleave(k))
    assert torch.equal(world.all_templates(20)[0][k * 0:k], t)
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        world.prompt_index("a red circle moving sideways")


@pytest.mark.parametrize("num_frames", [12, 36])
def test_templates_are_farther_apart_than_their_match_radius(world, num_frames):
    videos, ids = world.all_templates(num_frames)
    d = pairwise_distance(videos, videos)
    radius = match_radii(world, num_frames, 1.0)
    same = ids[:, None] == ids[None]
    other = same & ~torch.eye(len(ids), dtype=torch.bool)
    # A one-pixel move costs 0.25 to 0.35 at 16 x 16 (by shape and path), the same at any length.
    assert 0.24 < radius.min() < radius.max() < 0.36
    # A prompt's own templates lie outside each other's radius with room to spare (at least 0.15),
    # so a matched sample reaches one template and coverage can tell them apart.
    assert (d - radius[:, None])[other].min() > 0.15
    # Another prompt's templates are about a one-pixel move away or more (0.316 min: black and blue
    # triangles on one path differ by one channel); the nearest-template rule tells them apart.
    assert d[~same].min() > 0.3
    assert (d - radius[:, None])[~same].min() > -0.01


def test_match_radius_is_the_distance_to_the_moved_template(world):
    prompt = "a red square moving left"
    p, k = world.prompt_index(prompt), world.templates_per_prompt
    _, colour, shape, _, _ = prompt.split()
    centres, templates = world.centres(prompt), world.templates(prompt)
    for px in (0.5, 1.0):
        moves = [(px, 0.0), (-px, 0.0), (0.0, px), (0.0, -px)]
        d = torch.stack([pairwise_distance(world.render(colour, shape, centres + torch.tensor(m, dtype=torch.float64)),
                                           templates).diagonal() for m in moves])
        # The four moves cost differently (at 1 px: 0.23 to 0.31; a move out of the frame costs least), so the
        # radius is their mean.
        assert (d.max(dim=0).values - d.min(dim=0).values > 0.01).all()
        assert torch.allclose(match_radii(world, world.num_frames, px)[p * k:(p + 1) * k], d.mean(dim=0), atol=1e-9)


def test_long_clips_are_defined_and_the_shape_stays_in_the_frame(world):
    videos, ids = world.all_templates(36)                        # 3x the training length
    k = world.templates_per_prompt
    bg = torch.tensor(BACKGROUND)[:, None, None]
    # Drawn on a frame with a 4-pixel margin, nothing lands in the margin: no part of a shape
    # is ever cut off by the frame's edge.
    big = ToyWorld(height=24, width=24)
    for p, prompt in enumerate(world.prompts):
        _, colour, shape, _, _ = prompt.split()
        drawn = big.render(colour, shape, world.centres(prompt, 36) + 4)
        assert torch.equal(drawn[..., 4:20, 4:20], videos[p * k:(p + 1) * k]), prompt
        drawn[..., 4:20, 4:20] = bg
        assert (drawn == bg).all(), prompt
    # How much of each pixel the shape covers, in [0, 1], and the centroid of that coverage.
    colour = torch.tensor([COLOURS[world.prompts[p].split()[1]] for p in ids.tolist()])
    alpha = (videos - bg).abs().sum(2) / (colour[..., None, None] - bg).abs().sum(1)[:, None]
    ys, xs = torch.meshgrid(torch.arange(16) + 0.5, torch.arange(16) + 0.5, indexing="ij")
    centre = torch.stack([(alpha * xs).sum((-1, -2)), (alpha * ys).sum((-1, -2))], -1) \
        / alpha.sum((-1, -2))[..., None]                          # [M, F, 2]
    for p, prompt in enumerate(world.prompts):
        c = centre[p * k:(p + 1) * k]
        step = torch.tensor(DIRECTIONS[prompt.split()[-1]], dtype=torch.float32)
        along, across = (c[..., 0], c[..., 1]) if step[0] else (c[..., 1], c[..., 0])
        # The first move goes the prompted way at the configured speed ...
        assert torch.allclose(c[:, 1] - c[:, 0], world.speed * step.expand(k, 2), atol=0.1), prompt
        # ... the shape then bounces from side to side (its centre spans 4..12) ...
        assert (along.amax(1) - along.amin(1) > 7.5).all(), prompt
        # ... and never drifts across the motion axis (anti-aliasing moves a triangle's
        # coverage centroid by < 0.2 px as it slides).
        assert torch.allclose(across, across[:, :1].expand_as(across), atol=0.2), prompt


def test_exact_teacher_samples_match_their_prompt_and_cover_its_templates(world, encoder, teacher):
    # 48 samples per prompt for 6 templates: each template is missed with probability (5/6)^48.
    prompts = [p for p in world.prompts for _ in range(48)]
    x = sample_teacher(teacher, encoder, prompts, world.num_frames, steps=50, shift=5.0,
                       generator=torch.Generator().manual_seed(0))
    result = evaluate(x, prompts, world)
    assert result["match_rate"] >= 0.99
    assert len(result["coverage_per_prompt"]) == 48
    assert min(result["coverage_per_prompt"].values()) >= 0.9


def test_guided_teacher_samples_of_long_clips_match(world, encoder, teacher):
    # Every colour, shape and direction (prompts 0, 5, 10, ...), 3x the training length, with
    # classifier-free guidance: the unconditional branch runs over all templates.
    prompts = world.prompts[::5]
    x = sample_teacher(teacher, encoder, prompts, 36, steps=50, shift=5.0,
                       guidance_scale=3.0, generator=torch.Generator().manual_seed(1))
    assert evaluate(x, prompts, world)["match_rate"] >= 0.99


def test_at_tiny_noise_the_denoiser_returns_the_nearest_template(world, encoder, teacher):
    prompt = "a green triangle moving down"
    t = world.templates(prompt).double()
    # Closer to template 1 than to template 4, and off both: the answer is exactly template 1.
    x = (0.6 * t[1] + 0.4 * t[4])[None]
    ctx = encoder([prompt])["prompt_embeds"]
    timestep = torch.tensor([1.0])                               # s = 0.001
    x0 = teacher.x0(x, timestep, ctx)
    assert torch.allclose(x0[0], t[1], atol=1e-9)
    v = teacher(x, timestep, ctx)
    assert torch.allclose(x - 1e-3 * v, x0, atol=1e-9)           # x_t - s v = x0_hat


def test_at_full_noise_the_denoiser_returns_the_mean_template(world, encoder, teacher):
    x = torch.randn(2, world.num_frames, 3, 16, 16, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    ctx = encoder(["a black square moving right", ""])["prompt_embeds"]
    x0 = teacher.x0(x, torch.full((2, world.num_frames), 1000.0), ctx)
    assert torch.allclose(x0[0], world.templates("a black square moving right").double().mean(0))
    assert torch.allclose(x0[1], world.all_templates()[0].double().mean(0))   # unconditional


def test_posterior_with_per_frame_noise_equals_brute_force():
    world = ToyWorld(height=10, width=10, num_frames=3, radius=2.0, lanes=2, phases=2)
    encoder = ToyTextEncoder()
    teacher = ExactTeacher(world, encoder)
    prompts = ["a red circle moving up", "", "a blue square moving left"]
    g = torch.Generator().manual_seed(0)
    # Noise levels differ per frame and row; 1000 (pure noise) and 0.5 (s = 5e-4) included.
    timestep = torch.tensor([[1000.0, 700.0, 300.0], [900.0, 850.0, 1000.0], [600.0, 400.0, 0.5]],
                            dtype=torch.float64)
    s = timestep / 1000
    videos, ids = world.all_templates()
    videos = videos.double()
    truth = torch.stack([videos[ids == world.prompt_index(p)][0] if p else videos[0] for p in prompts])
    x = (1 - s)[..., None, None, None] * truth + s[..., None, None, None] * torch.randn(
        truth.shape, generator=g, dtype=torch.float64)
    expected = []
    for b, p in enumerate(prompts):
        own = videos if p == "" else videos[ids == world.prompt_index(p)]
        normal = torch.distributions.Normal((1 - s[b])[:, None, None, None] * own,
                                            s[b][:, None, None, None])
        w = torch.softmax(normal.log_prob(x[b]).sum((1, 2, 3, 4)), dim=0)
        expected.append((w[:, None, None, None, None] * own).sum(0))
    ctx = encoder(prompts)["prompt_embeds"]
    x0 = teacher.x0(x, timestep, ctx)
    assert torch.allclose(x0, torch.stack(expected), rtol=0, atol=1e-10)
    v = teacher(x, timestep, ctx)
    assert torch.allclose(v, (x - x0) / s[..., None, None, None], atol=1e-8)
    # A frame at s = 1 carries nothing: changing it leaves the posterior as it was.
    x2 = x.clone()
    x2[0, 0] += 5.0
    assert torch.allclose(teacher.x0(x2, timestep, ctx)[0, 1:], x0[0, 1:], atol=1e-12)
    # One timestep per row is the same as that timestep on every frame.
    assert torch.equal(teacher(x, torch.full((3,), 400.0), ctx),
                       teacher(x, torch.full((3, 3), 400.0), ctx))


def test_teacher_rejects_context_that_is_no_toy_prompt(encoder, teacher):
    ctx = encoder(["a red circle moving left"])["prompt_embeds"]
    with pytest.raises(ValueError, match="match no toy prompt"):
        teacher(torch.zeros(1, 12, 3, 16, 16), torch.tensor([500.0]), ctx + 0.5)
    with pytest.raises(ValueError, match="context must be toy prompt_embeds"):
        teacher(torch.zeros(1, 12, 3, 16, 16), torch.tensor([500.0]), ctx[:, :4])
    with pytest.raises(ValueError, match=r"x must be \[B, F, 3, 16, 16\]"):
        teacher(torch.zeros(1, 12, 3, 8, 8), torch.tensor([500.0]), ctx)
    with pytest.raises(ValueError, match="timestep must be"):
        teacher(torch.zeros(1, 12, 3, 16, 16), torch.tensor([500.0, 500.0]), ctx)


def test_text_encoder_embeddings(encoder):
    out = encoder(["a red circle moving left", "A  BLUE square moving up", ""])
    e, m = out["prompt_embeds"], out["attention_mask"]
    assert tuple(e.shape) == (3, 8, 32) and e.dtype == torch.float32 and m.dtype == torch.bool
    assert m.sum(1).tolist() == [5, 5, 0]
    assert e[:, 5:].abs().max() == 0 and e[2].abs().max() == 0   # padding and "" are zeros
    assert torch.equal(e[1], ToyTextEncoder()(["a blue square moving up"])["prompt_embeds"][0])
    gram = encoder.table @ encoder.table.T / 32                   # orthonormal word vectors
    assert torch.allclose(gram, torch.eye(len(VOCABULARY)), atol=1e-5)


def test_unknown_word_is_a_clear_error(encoder):
    with pytest.raises(ValueError) as err:
        encoder(["a purple circle moving left"])
    message = str(err.value)
    assert "'purple'" in message
    assert all(word in message for word in VOCABULARY)


def test_identity_vae():
    vae = IdentityVAE()
    x = torch.linspace(-2, 2, 2 * 3 * 3 * 4 * 4).view(2, 3, 3, 4, 4)
    assert vae.encode(x) is x
    assert torch.equal(vae.decode(x), x.clamp(-1, 1))
    assert (vae.latent_channels, vae.temporal_compression, vae.spatial_compression) == (3, 1, 1)
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        vae.encode(x.transpose(1, 2)[:, :, :2])


def test_datasets_are_deterministic_and_balanced(world):
    a, b = ToyPromptDataset(world, 100, seed=3), ToyPromptDataset(world, 100, seed=3)
    assert [a[i] for i in range(100)] == [b[i] for i in range(100)]
    assert sorted(a[i] for i in range(48)) == sorted(world.prompts)
    assert [a[i] for i in range(48)] != [ToyPromptDataset(world, 100, seed=4)[i] for i in range(48)]
    with pytest.raises(IndexError):
        a[100]
    videos = ToyVideoDataset(world, 100, seed=3, num_frames=20)
    item = videos[7]
    assert item["prompts"] == a[7]
    own = world.templates(item["prompts"], 20)
    assert min((own - item["video"]).abs().amax().item() for own in own) == 0


def test_config_files_instantiate_the_toy_parts():
    model = OmegaConf.load(CONFIGS / "model" / "toy.yaml")
    data = OmegaConf.load(CONFIGS / "data" / "toy.yaml")
    cfg = OmegaConf.create({"model": model, "data": data})   # as the root config composes them
    teacher = instantiate(cfg.model.teacher)
    assert isinstance(teacher, ExactTeacher) and len(teacher.state_dict()) == 0
    assert isinstance(instantiate(cfg.model.vae), IdentityVAE)
    prompts = instantiate(cfg.data.prompts)
    assert len(prompts) == 4800 and prompts[0] in teacher.world.prompts
    assert tuple(instantiate(cfg.data.videos)[0]["video"].shape) == (12, 3, 16, 16)
    assert cfg.model.backbone.text_dim == instantiate(cfg.model.text_encoder).text_dim
    assert cfg.model.backbone.in_channels == cfg.model.vae.latent_channels
    assert dict(cfg.model.backbone) == {
        "patch_size": [1, 2, 2], "num_attention_heads": 4, "attention_head_dim": 16,
        "in_channels": 3, "out_channels": 3, "text_dim": 32, "freq_dim": 64, "ffn_dim": 256,
        "num_layers": 4, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6, "rope_max_seq_len": 1024}
    # Config is data: every key carries its one-line comment.
    for path in (CONFIGS / "model" / "toy.yaml", CONFIGS / "data" / "toy.yaml"):
        for line in path.read_text().splitlines():
            key = line.split("#")[0]
            if ":" in key and "_target_" not in key:
                assert "#" in line, f"{path.name}: no comment on {line!r}"


def test_gathered_posterior_equals_the_per_prompt_loop():
    """The GPU path of the exact teacher (one batched gather) equals the CPU path (a loop over prompts)."""
    world = ToyWorld()
    text = ToyTextEncoder()
    teacher = ExactTeacher(world, text)
    prompts = [world.prompts[3], world.prompts[3], world.prompts[17], ""]
    context = text(prompts)["prompt_embeds"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, world.num_frames, 3, world.height, world.width, generator=g, dtype=torch.float64)
    sigma = torch.rand(4, world.num_frames, generator=g, dtype=torch.float64)
    x_t = x.flatten(2)
    looped = teacher._x0(x_t, sigma, context)
    gathered = teacher._x0_gathered(x_t, sigma, context)
    assert (looped - gathered).abs().max().item() <= 1e-12
