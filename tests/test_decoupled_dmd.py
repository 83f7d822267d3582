"""Decoupled DMD (model/decoupled_dmd.py): the loss and its gradient equal the paper's eq. 8 on fixed
float64 tensors; with one timestep and weights (1, 1) it is DMD exactly, as a formula and as one
generator step on the toy world; the CA timestep stays below the student's input step; it trains."""

import json

import pytest
import torch

import train
from engine.config import validate
from model.base import MethodConfig
from model.decoupled_dmd import DecoupledDMD, DecoupledDMDConfig, decoupled_dmd_loss
from model.dmd import DMD, dmd_loss
from pipeline.rollout import chunk_starts
from tests.toy_setup import toy_method
from tests.train_setup import compose_config


def fixed(seed=0, n=6, shape=(2, 4, 3, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def per_sample_mean_abs(t):
    return t.abs().mean(dim=(1, 2, 3, 4), keepdim=True)


@pytest.mark.parametrize("masked", [False, True])
def test_loss_and_gradient_equal_eq_8(masked):
    """Two timesteps' predictions, weights (0.7, 1.9), alpha = 1 + g = 3.5: g_total = w_DM (fake - real_c) / n_DM
    - w_CA (alpha - 1)(real_c' - real_u') / n_CA, each n the mean |x - real_cfg| at its own timestep."""
    x, fake, real_dm, uncond_dm, real_ca, uncond_ca = fixed()
    g, w_dm, w_ca = 2.5, 0.7, 1.9
    cfg_dm, cfg_ca = real_dm + g * (real_dm - uncond_dm), real_ca + g * (real_ca - uncond_ca)  # model/base.py guided_x0
    x.requires_grad_(True)
    mask = torch.tensor([False, True, True, False]) if masked else None
    loss, grad_norm, dm_norm, ca_norm = decoupled_dmd_loss(
        x, (fake, real_dm, cfg_dm), (real_ca, cfg_ca, cfg_ca), dm_weight=w_dm, ca_weight=w_ca, mask=mask)
    loss.backward()
    alpha = 1 + g  # the paper's eq. 4 convention: uncond + alpha (cond - uncond)
    dm = w_dm * (fake - real_dm) / per_sample_mean_abs(x.detach() - cfg_dm)
    ca = -w_ca * (alpha - 1) * (real_ca - uncond_ca) / per_sample_mean_abs(x.detach() - cfg_ca)
    total = dm + ca
    keep = mask if masked else torch.ones(4, dtype=torch.bool)
    count = x[:, keep].numel()
    expected_grad = torch.zeros_like(x)
    expected_grad[:, keep] = total[:, keep] / count
    expected_loss = 0.5 * (total[:, keep] ** 2).sum() / count
    assert abs(loss.item() - expected_loss.item()) <= 1e-12 * expected_loss.item()
    assert (x.grad - expected_grad).abs().max().item() <= 1e-12 * expected_grad.abs().max().item()
    for got, want in ((grad_norm, total), (dm_norm, dm), (ca_norm, ca)):
        assert abs(got.item() - want.abs().mean().item()) <= 1e-12 * want.abs().mean().item()
    # a part left out is 0; normaliser "none" (ref None) leaves it unscaled
    x.grad = None
    decoupled_dmd_loss(x, None, (real_ca, cfg_ca, None), ca_weight=w_ca)[0].backward()
    assert torch.allclose(x.grad, -w_ca * (alpha - 1) * (real_ca - uncond_ca) / x.numel(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("g", [0.0, 1.0, 3.0])
def test_one_timestep_and_equal_weights_is_dmd(g):
    """Both parts on the same predictions, weights (1, 1), normaliser cfg: DMD's loss and gradient (dmd_loss)."""
    x, fake, real, uncond = fixed(1, 4)
    guided = real + g * (real - uncond)
    mask = torch.tensor([True, False, True, True])
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours, ours_norm, _, _ = decoupled_dmd_loss(x1, (fake, real, guided), (real, guided, guided), mask=mask)
    theirs, theirs_norm = dmd_loss(x2, guided, fake, mask)
    ours.backward(), theirs.backward()
    loss_err = abs(ours.item() - theirs.item()) / theirs.item()
    grad_err = ((x1.grad - x2.grad).abs().max() / x2.grad.abs().max()).item()
    print(f"g={g}: DMD reduction on fixed float64 tensors: loss rel err {loss_err:.1e}, gradient max rel err {grad_err:.1e}")
    assert loss_err <= 1e-14 and grad_err <= 1e-14
    assert abs(ours_norm.item() - theirs_norm.item()) <= 1e-14 * theirs_norm.item()


def generator_step(cls, cfg_cls=DecoupledDMDConfig, **cfg):
    """One generator_loss on the toy world (exact teacher, tiny Wan student and critic) and its gradients."""
    model, _ = toy_method(cls, cfg_cls, **cfg)
    loss, logs = model.generator_loss({"prompts": ["a red circle moving left", "a blue square moving up"]})
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.generator.named_parameters() if p.grad is not None}
    return model, loss.detach(), logs, grads


@pytest.mark.parametrize("g", [1.0, 3.0])
def test_shared_timestep_generator_step_equals_dmd_on_the_toy_world(g):
    torch.set_num_threads(1)
    _, loss_dmd, _, grads_dmd = generator_step(DMD, MethodConfig, guidance_scale=g)
    _, loss, logs, grads = generator_step(DecoupledDMD, guidance_scale=g, shared_timestep=True, dm_weight=1.0,
                                          ca_weight=1.0, normalizer="cfg")
    assert grads.keys() == grads_dmd.keys() and grads
    loss_err = abs(loss.item() - loss_dmd.item()) / loss_dmd.item()
    scale = max(v.abs().max().item() for v in grads_dmd.values())
    grad_err = max((grads[n] - grads_dmd[n]).abs().max().item() for n in grads) / scale
    print(f"g={g}: toy generator step vs DMD: loss rel err {loss_err:.1e}, generator gradient max rel err {grad_err:.1e}")
    assert scale > 0 and loss_err <= 1e-12 and grad_err <= 1e-6
    assert logs["ca_grad_norm"] > 0 and logs["dm_grad_norm"] > 0 and logs["ca_timestep"] == logs["score_timestep"]


class Recorder(torch.nn.Module):
    """Wraps a score network and records the timestep of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, context, **kw):
        self.calls.append(t.clone())
        return self.net(x, t, context, **kw)


def test_ca_timestep_stays_below_the_students_input_step():
    """The default (Decoupled-Hybrid): CA re-noised below the exit step's input timestep, DM over the whole range."""
    model, _ = toy_method(DecoupledDMD, DecoupledDMDConfig)
    cfg = model.cfg
    assert (cfg.shared_timestep, cfg.ca_ts_schedule, cfg.ca_ts_schedule_max, cfg.ts_schedule, cfg.ts_schedule_max) == (
        False, False, True, False, False)
    for k, step in enumerate(model.steps):
        denoised = model.denoised_range([k] * 3)
        ca = torch.cat([model.ca_timestep(2, 6, denoised) for _ in range(100)])
        dm = torch.cat([model.score_timestep(2, 6, denoised) for _ in range(100)])
        assert (ca < step + 1e-3).all() and (ca >= 20).all(), (k, ca.max())  # min_step_ratio clamps at 20
        assert torch.equal(ca[:, :1].expand_as(ca), ca)  # one timestep per sample, over all frames
        if k > 0:
            assert (dm > step).any() and ca.max() > 0.7 * step  # DM is not bounded; CA spans its range
    # one generator step: which calls happen at which timestep
    model.reseed(0, 0, "generator", [0, 1])
    model.real_score, model.fake_score = Recorder(model.real_score), Recorder(model.fake_score)
    exits = []
    plan = model.plan_rollout
    model.plan_rollout = lambda: exits.append(plan()) or exits[-1]
    _, logs = model.generator_loss({"prompts": ["a red circle moving left", "a blue square moving up"]})
    (_, exit_steps), = exits
    real, fake = model.real_score.calls, model.fake_score.calls
    assert len(fake) == 1 and len(real) == 4  # DM: fake_c, real_c, real_u (for n_DM); CA: real_c, real_u
    assert torch.equal(fake[0], real[0]) and torch.equal(real[0], real[1]) and torch.equal(real[2], real[3])
    assert (real[2] < model.steps[exit_steps[0]] + 1e-3).all()
    assert logs["ca_timestep"] == real[2].mean() and logs["score_timestep"] == real[0].mean()


def test_generator_loss_wires_the_parts_as_eq_8():
    """The default generator_loss equals decoupled_dmd_loss on the method's own draws and predictions,
    with weights (0.5, 2), re-derived here step by step (DM's draws first, as DMD's, then CA's)."""
    prompts = ["a red circle moving left", "a blue square moving up"]
    model, _ = toy_method(DecoupledDMD, DecoupledDMDConfig, guidance_scale=2.0, dm_weight=0.5, ca_weight=2.0)
    loss, logs = model.generator_loss({"prompts": prompts})
    model.reseed(0, 0, "test", [0, 1])
    with torch.no_grad():
        video, mask, denoised = model.generate({"prompts": prompts})
        context = model.encode(prompts)
        t_dm = model.score_timestep(2, 6, denoised)
        x_dm = model.schedule.add_noise(video, model.rng.randn_like(video), t_dm)
        t_ca = model.ca_timestep(2, 6, denoised)
        x_ca = model.schedule.add_noise(video, model.rng.randn_like(video), t_ca)
        fake = model.x0(model.fake_score, x_dm, t_dm, context)
        real_dm = model.x0(model.real_score, x_dm, t_dm, context)
        cfg_dm = model.guided_x0(model.real_score, x_dm, t_dm, context, 2.0)
        real_ca = model.x0(model.real_score, x_ca, t_ca, context)
        cfg_ca = model.guided_x0(model.real_score, x_ca, t_ca, context, 2.0)
        expected, *_ = decoupled_dmd_loss(video, (fake, real_dm, cfg_dm), (real_ca, cfg_ca, cfg_ca),
                                          dm_weight=0.5, ca_weight=2.0, mask=mask)
    assert abs(loss.item() - expected.item()) <= 1e-12 * expected.item()
    assert logs["ca_timestep"] == t_ca.mean() and logs["score_timestep"] == t_dm.mean()
    # a part weighted 0 is not computed; alpha = 1 (g = 0) leaves CA out
    for knobs in ({"ca_weight": 0.0}, {"guidance_scale": 0.0}, {"dm_weight": 0.0}):
        _, _, logs, grads = generator_step(DecoupledDMD, **knobs)
        zero = "dm_grad_norm" if knobs.get("dm_weight") == 0 else "ca_grad_norm"
        assert logs[zero] == 0 and logs["dmd_grad_norm"] > 0 and grads


def test_a_bidirectional_few_step_student_trains():
    """num_frame_per_block = num_training_frames: one block, full attention; both losses run."""
    model, loss, logs, grads = generator_step(DecoupledDMD, num_frame_per_block=6, num_training_frames=6)
    assert chunk_starts(model.pattern, 6) == [0]  # one block: the rollout is bidirectional
    assert torch.isfinite(loss) and logs["ca_grad_norm"] > 0 and logs["dm_grad_norm"] > 0
    assert sum(g.abs().sum() for g in grads.values()) > 0
    critic, _ = model.critic_loss({"prompts": ["a red circle moving left", "a blue square moving up"]})
    assert torch.isfinite(critic)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="normalizer must be one of"):
        DecoupledDMDConfig(normalizer="mean")
    with pytest.raises(ValueError, match="same_step_across_blocks=true"):
        DecoupledDMDConfig(same_step_across_blocks=False)
    DecoupledDMDConfig(same_step_across_blocks=False, ca_ts_schedule_max=False)  # unbounded CA: fine
    DecoupledDMDConfig(same_step_across_blocks=False, shared_timestep=True)  # one draw from DMD's range: fine


def test_toy_preset_trains_two_steps(tmp_path):
    cfg = compose_config("experiment=toy_decoupled_dmd", "max_steps=2", "checkpoint.every=0", "logger.every=1")
    assert cfg.method._target_ == "model.decoupled_dmd.DecoupledDMD" and cfg.method.guidance_scale == 1.0
    validate(cfg)
    run_dir = tmp_path / "toy_decoupled_dmd"
    train.train(cfg, run_dir)
    assert (run_dir / "checkpoints" / "step_000002" / "export" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    generator = [r for r in rows if "generator_loss" in r]
    assert generator and all(r["ca_grad_norm"] > 0 and r["dm_grad_norm"] > 0 for r in generator)


def test_toy_preset_is_the_embedded_default_with_this_method():
    """experiment=toy_decoupled_dmd composes to the default toy run but for the method and its new knobs."""
    plain = compose_config(tiny=False)
    ours = compose_config("experiment=toy_decoupled_dmd", tiny=False)
    new = {"shared_timestep", "ca_ts_schedule", "ca_ts_schedule_max", "dm_weight", "ca_weight", "normalizer"}
    assert set(ours.method) - set(plain.method) == new
    assert {k: v for k, v in ours.method.items() if k not in new | {"_target_"}} == \
        {k: v for k, v in plain.method.items() if k != "_target_"}
    for key in set(plain) - {"method"}:
        assert ours[key] == plain[key], key
