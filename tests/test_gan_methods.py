"""DMD2's GAN term (model/dmd2.py) and f-distill (model/fdistill.py): losses against their formulas,
exact reductions to plain DMD, where gradients go, weights across splits, presets, resume, bad input."""

import math
import os

import pytest
import torch

import train
from engine.build import build_method, build_optimizer
from engine.config import validate
from engine.trainer import DataSources, Optimized, run_phase
from model.dmd import dmd_loss
from model.dmd2 import gan_discriminator_loss, gan_generator_loss, r1_penalty
from model.fdistill import DIVERGENCES, fdiv_weights
from tests.dist_setup import spawn_ranks
from tests.test_train import checkpoint_tensors
from tests.train_setup import compose_config
from utils import distributed as D

LOGITS = torch.tensor([-7.0, -1.3, 0.0, 0.4, 2.5, 6.0], dtype=torch.float64)


# ---------------------------------------------------------------------------- formulas
def test_gan_losses_and_gradients_match_their_formulas():
    fake = LOGITS.clone().requires_grad_(True)
    real = LOGITS.flip(0).clone().requires_grad_(True)
    n = len(LOGITS)
    g = gan_generator_loss(fake)
    assert abs(g.item() - sum(math.log1p(math.exp(-v)) for v in LOGITS.tolist()) / n) < 1e-14
    (grad,) = torch.autograd.grad(g, fake)
    assert torch.allclose(grad, -torch.sigmoid(-LOGITS) / n, atol=1e-15, rtol=0)  # d softplus(-D) = -sigmoid(-D)
    d = gan_discriminator_loss(fake, real)
    want = sum(math.log1p(math.exp(v)) for v in LOGITS.tolist()) / n + sum(math.log1p(math.exp(-v)) for v in LOGITS.flip(0).tolist()) / n
    assert abs(d.item() - want) < 1e-14
    d_fake, d_real = torch.autograd.grad(d, (fake, real))
    assert torch.allclose(d_fake, torch.sigmoid(LOGITS) / n, atol=1e-15, rtol=0)
    assert torch.allclose(d_real, -torch.sigmoid(-LOGITS.flip(0)) / n, atol=1e-15, rtol=0)
    r1 = r1_penalty(LOGITS + 0.003, LOGITS, 0.01)
    assert abs(r1.item() - 0.09) < 1e-12  # ((0.003 / 0.01)^2)


def test_fdiv_weights_match_the_table():
    r = LOGITS.clamp(-5, 5).exp()
    want = {"reverse_kl": torch.ones_like(r), "kl": r, "js": r / (1 + r), "hellinger": r ** 0.5,
            "jeffreys": 1 + r, "neyman": 1 / r}
    assert set(want) == set(DIVERGENCES)
    for name, w in want.items():
        got = fdiv_weights(LOGITS.float(), name, 5.0)
        assert got.dtype == torch.float64 and torch.allclose(got, w, rtol=1e-6, atol=0), name
    assert torch.equal(fdiv_weights(LOGITS, "kl", None), LOGITS.exp())  # no clip


def test_weighted_dmd_loss_gradient_is_the_weighted_dmd_gradient():
    gen = torch.Generator().manual_seed(0)
    x, real, fake = (torch.randn(3, 4, 2, 3, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    weight = torch.tensor([0.5, 1.0, 2.5], dtype=torch.float64)
    x.requires_grad_(True)
    loss, _ = dmd_loss(x, real, fake, weight=weight)
    (grad,) = torch.autograd.grad(loss, x)
    g = (fake - real) / (x.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    want = weight.view(-1, 1, 1, 1, 1) * g / x.numel()
    assert (grad - want).abs().max().item() < 1e-15
    plain, _ = dmd_loss(x, real, fake)
    ones, _ = dmd_loss(x, real, fake, weight=torch.ones(3, dtype=torch.float64))
    assert torch.equal(plain, ones)


# ---------------------------------------------------------------------------- reductions to DMD
def generator_grads(cfg, ids=(0, 1)):
    torch.manual_seed(0)
    method = build_method(cfg, torch.device("cpu"))
    method.reseed(cfg.seed, 3, "generator", list(ids))
    prompts = [method_prompt(cfg, i) for i in ids]
    loss, logs = method.generator_loss({"prompts": prompts})
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in method.generator.named_parameters()}, method


def method_prompt(cfg, i):
    from hydra.utils import instantiate

    return instantiate(cfg.data.prompts)[i]  # the toy prompt data set yields the prompt itself


@pytest.mark.parametrize("method", ["dmd2", "fdistill"])
def test_without_the_gan_term_and_with_reverse_kl_the_generator_step_is_plain_dmds(method):
    dmd_loss_, dmd_grads, _ = generator_grads(compose_config("method=dmd"))
    extra = ["method.fdiv.divergence=reverse_kl"] if method == "fdistill" else []
    loss, grads, _ = generator_grads(compose_config(f"method={method}", "method.gan.generator_weight=0", *extra))
    assert torch.equal(loss, dmd_loss_)
    assert all(torch.equal(grads[n], dmd_grads[n]) for n in dmd_grads)
    # and the GAN term or a non-trivial divergence really changes the step
    other = ["method.gan.generator_weight=1"] if method == "dmd2" else ["method.gan.generator_weight=0", "method.fdiv.divergence=kl"]
    _, changed, _ = generator_grads(compose_config(f"method={method}", *other))
    assert max((changed[n] - dmd_grads[n]).abs().max().item() for n in dmd_grads) > 1e-6


def test_discriminator_gradients_reach_only_the_head_and_the_gan_term_reaches_the_generator():
    cfg = compose_config("method=dmd2", "method.gan.r1_weight=1")
    torch.manual_seed(0)
    method = build_method(cfg, torch.device("cpu"))
    data = DataSources(cfg.data, 2, 1, 1)
    phase = type(method).phases[1]
    ids, batch = data.get(phase.data, 0, 0, 0)
    assert {"prompts", "video", "videos_prompts"} <= set(batch)
    method.reseed(cfg.seed, 0, "critic", ids)
    with torch.no_grad():
        fake, _, denoised = method.generate(batch)
    loss, logs = method.discriminator_loss(fake, batch, denoised)
    loss.backward()
    assert logs["r1_penalty"] > 0
    head = list(method.discriminator.parameters())
    assert all(p.grad is not None for p in head) and sum(p.grad.abs().sum() for p in head) > 0
    assert all(p.grad is None for p in method.fake_score.parameters())
    assert all(p.grad is None for p in method.real_score.parameters())
    assert all(p.grad is None for p in method.generator.parameters())
    # with gan.train_critic the critic's features learn from it too (DMD2's sharing)
    method.zero_grad(set_to_none=True)
    method.cfg.gan.train_critic = True
    method.reseed(cfg.seed, 0, "critic", ids)
    method.discriminator_loss(fake, batch, denoised)[0].backward()
    assert sum(p.grad.abs().sum() for p in method.fake_score.parameters() if p.grad is not None) > 0
    # the generator's GAN term: a gradient through the critic's features into the clip
    video = fake.clone().requires_grad_(True)
    t = torch.full(video.shape[:2], 500.0)
    context = method.encode(batch["prompts"])
    noisy = method.schedule.add_noise(video, torch.randn_like(video), t)
    (grad,) = torch.autograd.grad(gan_generator_loss(method.discriminate(noisy, t, context)), video)
    assert grad.abs().sum() > 0


# ---------------------------------------------------------------------------- f-div weights across splits
def capture_weights(method):
    """Record the f-div weights of each loss call; the untrained head's logits are scaled up so that
    the weights differ clearly between samples."""
    with torch.no_grad():
        method.discriminator.classifier[-1].weight.mul_(300)
    seen = []
    original = method.sample_weights

    def wrapped(*args):
        out = original(*args)
        seen.append(out[0].detach().clone())
        return out

    method.sample_weights = wrapped
    return seen


FDIV = ("method=fdistill", "method.fdiv.divergence=kl", "method.fdiv.log_ratio_clip=null")


def _split_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    D.init_distributed("cpu")
    cfg = compose_config(*FDIV)
    torch.manual_seed(0)
    method = build_method(cfg, torch.device("cpu"))
    seen = capture_weights(method)
    method.reseed(cfg.seed, 3, "generator", [rank])
    method.generator_loss({"prompts": [method_prompt(cfg, rank)]})
    torch.save(seen[0], out / f"weights_{rank}.pt")
    D.barrier()
    D.destroy()


def test_fdiv_weights_are_normalised_over_ranks_and_micro_batches(tmp_path):
    """2 ranks x 1 sample and 1 rank x 2 micro-batches of 1 give the weights of 1 rank x 2 samples."""
    cfg = compose_config(*FDIV)
    torch.manual_seed(0)
    method = build_method(cfg, torch.device("cpu"))
    seen = capture_weights(method)
    method.reseed(cfg.seed, 3, "generator", [0, 1])
    method.generator_loss({"prompts": [method_prompt(cfg, 0), method_prompt(cfg, 1)]})
    whole = seen[0]
    assert whole.shape == (2,) and abs(whole.mean().item() - 1) < 1e-12 and (whole[0] - whole[1]).abs() > 0.1, whole
    spawn_ranks(_split_worker, 2, tmp_path)
    ranks = torch.cat([torch.load(tmp_path / f"weights_{r}.pt") for r in range(2)])
    # float32 forwards of 1 vs 2 samples differ by ~1e-8 in the logits, x300; normalising per rank would give 1, 1
    assert (ranks - whole).abs().max().item() < 1e-4, (ranks, whole)
    # accumulation: the engine's prepass gives the loss the global mean, and the step's gradient is the
    # one of the whole batch
    from utils.distributed import init_distributed

    dist = init_distributed()
    grads, weights = {}, {}
    for batch_size, accumulation in ((2, 1), (1, 2)):
        torch.manual_seed(0)
        method = build_method(cfg, torch.device("cpu"))
        seen = capture_weights(method)
        data = DataSources(cfg.data, batch_size, 1, accumulation)
        optimized = {name: Optimized(net, *build_optimizer(net.parameters(), cfg.optim.generator, 1), cfg.optim.generator)
                     for name, net in (("generator", method.generator), ("critic", method.fake_score),
                                       ("discriminator", method.discriminator))}
        run_phase(method, type(method).phases[0], optimized, data, 3, cfg.seed, dist, accumulation)
        grads[accumulation] = {n: p.grad.clone() for n, p in method.generator.named_parameters()}
        weights[accumulation] = torch.cat(seen)
    assert (weights[1] - weights[2]).abs().max().item() < 1e-4, weights
    scale = max(g.abs().max().item() for g in grads[1].values())
    worst = max((grads[1][n] - grads[2][n]).abs().max().item() for n in grads[1]) / scale
    assert scale > 0 and worst <= 1e-6, worst


# ---------------------------------------------------------------------------- presets, resume, bad input
def run(tmp_path, name, *overrides):
    cfg = compose_config(*overrides)
    validate(cfg)
    return tmp_path / name, train.train(cfg, tmp_path / name)


def test_fdistill_resumes_bit_exactly_with_its_discriminator(tmp_path):
    common = ("experiment=toy_fdistill_js", "dfake_gen_update_ratio=1", "method.gan.r1_weight=0.1", "checkpoint.every=2",
              "method.fdiv.ratio_bins=4", "method.fdiv.ratio_momentum=0.5")
    straight, _ = run(tmp_path, "straight", *common, "max_steps=4")
    run(tmp_path, "resumed", *common, "max_steps=2")
    resumed, _ = run(tmp_path, "resumed", *common, "max_steps=4", "resume=latest")
    a = checkpoint_tensors(straight / "checkpoints" / "step_000004", tmp_path)
    b = checkpoint_tensors(resumed / "checkpoints" / "step_000004", tmp_path)
    assert a.keys() == b.keys() and any(k.startswith(".discriminator.") for k in a)
    assert any(k.startswith(".discriminator_optim") for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    first = checkpoint_tensors(straight / "checkpoints" / "step_000002", tmp_path)
    assert any(not torch.equal(first[k], a[k]) for k in a if k.startswith(".discriminator."))
    # the running ratio means are run state: saved, restored, and they moved
    assert a[".ratio_stats.step"].item() == 3 and a[".ratio_stats.seen"].any()
    assert not torch.equal(first[".ratio_stats.mean"], a[".ratio_stats.mean"])


def test_running_ratio_means_fold_in_each_steps_global_batch_once():
    from model.fdistill import RatioStats

    stats = RatioStats(bins=2, momentum=0.5)
    t = torch.tensor([100.0, 900.0, 950.0, 400.0])
    assert stats.bin_of(t).tolist() == [0, 1, 1, 0]
    stats.begin_step(0)
    stats.add(torch.tensor([2.0, 1.0]), stats.bin_of(t[:2]))  # two micro-batches of one step
    stats.add(torch.tensor([3.0, 4.0]), stats.bin_of(t[2:]))
    assert stats.mean.tolist() == [1.0, 1.0]  # not before the next step
    stats.begin_step(0)  # the same step again (its prepass, another micro-batch): nothing folds in
    assert stats.mean.tolist() == [1.0, 1.0]
    stats.begin_step(1)
    assert stats.mean.tolist() == [3.0, 2.0] and stats.seen.tolist() == [True, True]  # first values: the means
    stats.add(torch.tensor([1.0]), stats.bin_of(t[:1]))
    stats.begin_step(2)
    assert stats.mean.tolist() == [2.0, 2.0]  # bin 0: 0.5 x 3 + 0.5 x 1; bin 1 saw nothing


def test_dmd2_preset_trains_a_few_steps(tmp_path):
    run_dir, _ = run(tmp_path, "gan", "experiment=toy_dmd2_gan", "max_steps=2", "logger.every=1")
    logs = [line for line in (run_dir / "log.jsonl").read_text().splitlines() if "gan_discriminator_loss" in line]
    assert logs and "gan_generator_loss" in (run_dir / "log.jsonl").read_text()


@pytest.mark.parametrize("overrides, message", [
    (("method=fdistill", "method.fdiv.divergence=chi2"), "method.fdiv.divergence='chi2'"),
    (("method=dmd2", "data.videos=null"), "DMD2's critic phase draws data.videos or data.ode_pairs"),
    (("method=dmd2", "method.gan.head=conv"), "method.gan.head='conv'"),
])
def test_bad_gan_and_fdiv_settings_fail_at_validation_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate(compose_config(*overrides))


def test_a_feature_block_past_the_critics_depth_names_the_key():
    cfg = compose_config("method=dmd2", "method.gan.blocks=[1,2]")  # the tiny critic has 2 blocks
    validate(cfg)
    with pytest.raises(ValueError, match=r"method.gan.blocks=\[1, 2\]: the critic has 2 blocks"):
        build_method(cfg, torch.device("cpu"))
