"""One rollout for training and inference; gradients only through exit steps; ranks agree."""

import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.dist_setup import free_port
from model.causvid import CausVid, CausVidConfig
from model.dmd import DMD
from model.schedule import FlowSchedule
from model.wan.attention import CausalPattern
from model.wan.kv_cache import CrossAttnCache, KVCache
from pipeline.rollout import rollout
from tests.toy_setup import toy_method, toy_parts

STEPS = FlowSchedule(5.0).denoising_steps([1000, 750, 500, 250], warp=True)
PATTERN = CausalPattern(num_frame_per_block=2)


def setup(frames=6, seed=0):
    world, text, _, generator, _, _ = toy_parts(seed, num_frames=frames)
    context = text(["a red circle moving left", "a blue square moving up"])["prompt_embeds"]
    noise = torch.randn(2, frames, 3, world.height, world.width, generator=torch.Generator().manual_seed(seed))
    return generator, context, noise


def test_training_rollout_without_grad_equals_inference():
    generator, context, noise = setup()
    schedule = FlowSchedule(5.0)
    inference = rollout(generator, noise, context, STEPS, PATTERN, schedule=schedule, context_noise=0.0,
                        rng=torch.Generator().manual_seed(7))
    with torch.no_grad():
        training = rollout(generator, noise, context, STEPS, PATTERN, schedule=schedule, exit_steps=[3, 3, 3],
                           grad_from_frame=0, rng=torch.Generator().manual_seed(7))
    assert torch.equal(training.video, inference.video)
    assert inference.video.shape == noise.shape and not inference.video.requires_grad
    assert inference.exit_steps == [3, 3, 3] and not inference.grad_mask.any()
    # and it is not trivially the noise: the steps really ran
    assert (inference.video - noise).abs().mean() > 0.1


def test_gradient_reaches_the_generator_only_through_the_exit_step():
    generator, context, noise = setup()
    schedule = FlowSchedule(5.0)
    weights = torch.randn_like(noise)
    exits = [2, 1, 1]
    out = rollout(generator, noise, context, STEPS, PATTERN, schedule=schedule, exit_steps=exits,
                  grad_from_frame=4, rng=torch.Generator().manual_seed(3))
    assert out.grad_mask.tolist() == [False] * 4 + [True] * 2
    # frames outside the gradient window lead to no parameter at all
    early = torch.autograd.grad((out.video[:, :4] * weights[:, :4]).sum(), list(generator.parameters()),
                                retain_graph=True, allow_unused=True, materialize_grads=True)
    assert all(g.abs().max() == 0 for g in early)
    generator.zero_grad()
    (out.video * weights).sum().backward()
    rollout_grads = {n: p.grad.clone() for n, p in generator.named_parameters()}

    # the same computation by hand: no-grad steps and context passes, then ONE call with grad
    generator.zero_grad()
    rng = torch.Generator().manual_seed(3)
    cache = KVCache.for_model(generator, PATTERN, batch_size=2, latent_hw=noise.shape[-2:], max_frames=6)
    cross = CrossAttnCache(generator.config.num_layers)

    def call(x, t, start):
        flow = generator(x, torch.full(x.shape[:2], t), context, kv_cache=cache, frame_offset=start, crossattn_cache=cross)
        return schedule.x0_from_flow(x, flow, t)

    with torch.no_grad():
        for start, exit_step in ((0, 2), (2, 1)):
            x = noise[:, start : start + 2]
            for i in range(exit_step):
                x = schedule.add_noise(call(x, STEPS[i], start), torch.randn(x.shape, generator=rng), STEPS[i + 1])
            call(call(x, STEPS[exit_step], start), 0.0, start)  # output, then context pass
        x = noise[:, 4:]
        x = schedule.add_noise(call(x, STEPS[0], 4), torch.randn(x.shape, generator=rng), STEPS[1])
    (call(x, STEPS[1], 4) * weights[:, 4:]).sum().backward()
    worst = max(
        ((rollout_grads[n] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item()
        for n, p in generator.named_parameters()
    )
    assert worst <= 1e-5
    assert sum(p.grad.abs().sum() for p in generator.parameters()) > 0


def test_causvid_whole_clip_equals_chunked_path():
    torch.manual_seed(0)
    diffusion, _ = toy_method(CausVid, CausVidConfig, teacher_forcing=False)
    teacher, _ = toy_method(CausVid, CausVidConfig, teacher_forcing=True)
    g = diffusion.generator
    b, frames = 2, 6
    latents = torch.rand(b, frames, 3, 8, 8) * 2 - 1
    context = diffusion.encode(["a red circle moving left", "a blue square moving up"])
    t = diffusion.block_timesteps(b, frames)
    assert t.shape == (b, frames)
    assert torch.isclose(t[..., None], torch.tensor(diffusion.steps)).any(-1).all()  # every t is a step
    assert torch.equal(t[:, 0::2], t[:, 1::2])  # one step per block
    noisy = diffusion.schedule.add_noise(latents, torch.randn_like(latents), t)
    with torch.no_grad():
        whole = diffusion.denoise_data(latents, noisy, t, context)
        cache = KVCache.for_model(g, diffusion.pattern, batch_size=b, latent_hw=(8, 8), max_frames=frames)
        chunks = [
            diffusion.schedule.x0_from_flow(noisy[:, s : s + 2], g(noisy[:, s : s + 2], t[:, s : s + 2], context, kv_cache=cache, frame_offset=s), t[:, s : s + 2])
            for s in (0, 2, 4)
        ]
        assert ((torch.cat(chunks, 1) - whole).abs().max() / whole.abs().max()).item() <= 1e-5
        # teacher forcing: block k sees the CLEAN earlier blocks: a whole-clip causal call on [clean, noisy_k]
        forced = teacher.denoise_data(latents, noisy, t, context)
        tg = teacher.generator
        mixed = torch.cat([latents[:, :4], noisy[:, 4:]], 1)
        mixed_t = torch.cat([torch.zeros(b, 4), t[:, 4:]], 1)
        ref = teacher.schedule.x0_from_flow(mixed, tg(mixed, mixed_t, context, causal=teacher.pattern), mixed_t)
        assert ((forced[:, 4:] - ref[:, 4:]).abs().max() / ref[:, 4:].abs().max()).item() <= 1e-5
        assert (forced[:, 4:] - teacher.denoise_data(latents, noisy, t, context)[:, 4:]).abs().max() == 0


def _plan_on_rank(rank: int, port: int, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, _ = toy_method(DMD, min_num_frames=2, max_num_frames=6, num_training_frames=2, same_step_across_blocks=False)
        model.host_rng = random.Random(1000 + rank)  # ranks disagree unless the plan is broadcast
        plans = [model.plan_rollout() for _ in range(5)]
        local = [random.Random(1000 + rank).random()]
        queue.put((rank, plans, local))
    finally:
        dist.destroy_process_group()


def test_exit_steps_and_rollout_length_agree_across_ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_plan_on_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (plans, local)) for r, plans, local in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0][1] != results[1][1]  # the ranks' own RNGs differ
    assert results[0][0] == results[1][0]  # but the plans agree
    lengths = {n for n, _ in results[0][0]}
    assert lengths <= {2, 4, 6} and len(lengths) > 1  # the rollout length really is sampled
    assert all(len(exits) == n // 2 for n, exits in results[0][0])
