"""DCM (model/dcm.py): the Euler grid, phases, consistency target and losses against their formulas, the two experts
(where gradients go, the switch by timestep, the exported experts and the adapter file), inference's Euler steps,
mode=both resumed mid-stage, one step of each stage on the tiny Wan folder, and one-line errors for bad input."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file

import train
from engine.build import build_method
from engine.config import validate
from engine.lora import load_adapter
from engine.trainer import DataSources, updates_of
from model.dcm import DCM, ConsistencyTarget, DCMConfig, euler_sigmas, phase_edges, phase_end, pseudo_huber, temporal_loss
from model.wan.dual_expert import DualExpertDiT, is_detail
from model.schedule import FlowSchedule, shift_time
from model.wan.attention import CausalPattern
from model.wan.transformer import WanDiT
from model.wan.weights import load_strict
from pipeline.rollout import rollout
from tests.test_train import checkpoint_tensors
from tests.test_wan_training import wan_overrides
from tests.train_setup import compose_config
from tests.wan_folder import tiny_wan_folder  # noqa: F401  (session fixture)

CPU = torch.device("cpu")
FAST = ("experiment=toy_dcm", "method.detail.rank=4", "method.detail.alpha=8", "data.metrics=null")


def tiny(*overrides: str):
    cfg = compose_config(*FAST, *overrides)
    validate(cfg)
    return cfg


def batch_of(cfg, method, step: int) -> dict:
    data = DataSources(cfg.data, cfg.batch_size, 1, 1)
    ids, batch = data.get(DCM.phases[0].data, step, 0, 0)
    method.reseed(cfg.seed, step, "generator", ids)
    return batch


# ---------------------------------------------------------------------------- the grid, phases, target, losses
def test_the_grid_is_the_references_and_phases_end_at_their_edges():
    # the reference's EulerSolver: sigma[i] = scheduler sigmas (ascending) at 20 (i + 1) - 1, for 50 steps of shift 17
    reference = FlowMatchEulerDiscreteScheduler(shift=17.0).sigmas.numpy()[::-1][(torch.arange(1, 51) * 20 - 1).numpy()]
    s = euler_sigmas(50, 17.0)
    assert s[0] == 0 and s[50] == 1 and torch.allclose(s[1:], torch.tensor(reference.copy(), dtype=torch.float64), atol=1e-6)
    cfg = DCMConfig()
    assert cfg.split == 35 and cfg.boundary_timestep == pytest.approx(1000 * 17 * 0.7 / (1 + 16 * 0.7))  # 975.41
    # multiphase 1 (the reference's): the semantic expert jumps from (35, 50] to 35, the detail expert from (0, 35] to 0
    j = torch.arange(36, 51)
    assert phase_edges(35, 50, 1) == [35] and phase_end(j, [35]).tolist() == [35] * 15
    assert phase_edges(0, 35, 1) == [0] and phase_end(torch.arange(1, 36), [0]).tolist() == [0] * 35
    # four phases of the detail range: edges floor(m 35 / 4); a point jumps to the largest edge below it
    edges = phase_edges(0, 35, 4)
    assert edges == [0, 8, 17, 26]
    j = torch.tensor([[1, 8, 9, 17], [18, 26, 27, 35]])
    assert phase_end(j, edges).tolist() == [[0, 0, 8, 8], [17, 17, 26, 26]]


def test_teacher_step_with_cfg_and_the_consistency_target_match_a_hand_computation():
    cfg = tiny("method.guidance_scale=2.0", "method.num_frame_per_block=6")
    method = build_method(cfg, CPU)
    batch = batch_of(cfg, method, 3)
    out = method.jumps(batch, "semantic", grad=False)
    # the same draws again, then every formula of the module docstring by hand
    batch = batch_of(cfg, method, 3)
    clips = method.vae.encode(batch["video"]).float()
    context = method.encode(batch["prompts"])
    b, f = clips.shape[:2]
    j = method.block_step_index(b, f, 36, 51)  # (k, N] = (35, 50]
    assert (j[:, :1] == j).all() and 36 <= j.min() and j.max() <= 50  # one block: one point per clip
    noise = method.rng.randn_like(clips)
    s = shift_time(j.double() / 50, 5.0)[:, :, None, None, None]  # the toy preset's shift 5
    s_prev = shift_time((j - 1).double() / 50, 5.0)[:, :, None, None, None]
    s_end = shift_time(torch.full_like(j, 35).double() / 50, 5.0)[:, :, None, None, None]
    x_t = ((1 - s) * clips + s * noise).float()
    t = (1000 * s[:, :, 0, 0, 0]).float()
    v_c = method.real_score(x_t, t, context).float()
    v_u = method.real_score(x_t, t, method.negative(b)).float()
    v = v_u + 3.0 * (v_c - v_u)  # w = 1 + guidance_scale
    assert torch.allclose(method.teacher_flow(x_t, t, context), v, atol=1e-6)
    x_prev = x_t + (s_prev - s).float() * v
    t_prev = (1000 * s_prev[:, :, 0, 0, 0]).float()
    target = x_prev + (s_end - s_prev).float() * method.generator(x_prev, t_prev, context, expert="semantic")
    pred = x_t + (s_end - s).float() * method.generator(x_t, t, context, expert="semantic")
    assert torch.allclose(out["target"], target, atol=1e-5) and torch.allclose(out["pred"], pred, atol=1e-5)
    assert out["e"].unique().tolist() == [35]


def test_the_consistency_target_is_the_live_student_or_its_own_ema_and_takes_no_gradient():
    # target_decay 0 (the reference's): θ⁻ is the generator itself, called without gradient; no copy is kept
    cfg = tiny("method.num_frame_per_block=6")
    method = build_method(cfg, CPU)
    assert method.consistency_target.net is None and method.target_net is method.generator
    out = method.jumps(batch_of(cfg, method, 3), "detail", grad=True)
    assert out["pred"].grad_fn is not None and out["target"].grad_fn is None
    # target_decay 0.5: a copy of θ_0 that folds in θ once per step, before the step's losses
    cfg = tiny("method.num_frame_per_block=6", "method.target_decay=0.5", "ema_weight=0.9", "ema_start_step=0")
    method = build_method(cfg, CPU)
    target = method.consistency_target
    assert isinstance(target, ConsistencyTarget) and method.target_net is target
    theta0 = {n: p.detach().clone() for n, p in method.generator.named_parameters()}
    assert [n for n, p in target.net.named_parameters() if not torch.equal(p, theta0[n]) or p.requires_grad] == []

    def update(delta: float) -> None:  # a fixed optimizer step: every weight of both experts + delta
        with torch.no_grad():
            for p in method.generator.parameters():
                p.add_(delta)

    def target_is(offset: float) -> bool:
        return all(torch.allclose(p, theta0[n] + offset, atol=1e-6) for n, p in target.net.named_parameters())

    batch_of(cfg, method, 0)  # step 0 folds θ_0 into itself
    update(0.01)
    batch_of(cfg, method, 1)  # 0.5 θ_0 + 0.5 (θ_0 + 0.01)
    assert target_is(0.005) and int(target.folded) == 1
    batch_of(cfg, method, 1)  # a second micro-batch of step 1 folds nothing
    assert target_is(0.005)
    update(0.02)
    batch = batch_of(cfg, method, 2)  # 0.5 (θ_0 + 0.005) + 0.5 (θ_0 + 0.03)
    assert target_is(0.0175)
    out = method.jumps(batch, "detail", grad=True)
    loss = pseudo_huber(out["pred"], out["target"], 0.001)
    loss.backward()
    assert out["target"].grad_fn is None and all(p.grad is None for p in target.parameters())
    # by hand, with the same draws: the detail expert's jump to 0 from one teacher step below a point j in (0, 35]
    batch = batch_of(cfg, method, 2)
    clips, context = method.vae.encode(batch["video"]).float(), method.encode(batch["prompts"])
    j = method.block_step_index(clips.shape[0], clips.shape[1], 1, 36)
    noise = method.rng.randn_like(clips)
    s, s_prev = (shift_time(i.double() / 50, 5.0)[:, :, None, None, None].float() for i in (j, j - 1))
    x_t = (1 - s) * clips + s * noise
    x_prev = x_t + (s_prev - s) * method.real_score(x_t, 1000 * s[:, :, 0, 0, 0], context).float()  # no CFG: the toy's 0
    ema = copy.deepcopy(method.generator)
    with torch.no_grad():
        for n, p in ema.named_parameters():
            p.copy_(theta0[n] + 0.0175)
        jump = lambda net: x_prev - s_prev * net(x_prev, 1000 * s_prev[:, :, 0, 0, 0], context, expert="detail")  # noqa: E731
        assert torch.allclose(out["target"], jump(ema), atol=1e-5)
        assert not torch.allclose(out["target"], jump(method.generator), atol=1e-3)  # not the live student's
        pred = x_t - s * method.generator(x_t, 1000 * s[:, :, 0, 0, 0], context, expert="detail")
    assert torch.allclose(out["pred"], pred, atol=1e-5)


def test_the_steps_must_sit_on_every_phases_upper_end():
    two = DCMConfig(timestep_shift=5.0, multiphase=2, denoising_step_list=[1000, 840, 700, 340])
    assert two.phase_tops == [50, 42, 35, 17] and two.unstepped_tops() == []  # edges 35, 42 and 0, 17 (floor(35 / 2))
    assert [two.step_of(j) for j in two.phase_tops] == [1000, 840, 700, 340]
    # an unwarped list gives the same points as shifted timesteps: 1000 shift(j / 50) at shift 5
    shifted = DCMConfig(timestep_shift=5.0, multiphase=2, warp_denoising_step=False,
                        denoising_step_list=[1000, 963.3, 921.05, 720.34])
    assert shifted.unstepped_tops() == [] and shifted.step_of(42) == pytest.approx(1000 * 4.2 / 4.36, abs=0.01)
    # multiphase 1: the noise end and the boundary; a step between them is allowed (the default's 850)
    assert DCMConfig().phase_tops == [50, 35] and DCMConfig().unstepped_tops() == []
    with pytest.raises(ValueError) as error:
        DCMConfig(timestep_shift=5.0, multiphase=2)  # the default [1000, 850, 700, 350]
    assert "misses the upper end of a phase ([840.0, 340.0]: grid points [42, 17] of method.euler_steps=50)" in str(error.value)
    assert "e.g. method.denoising_step_list=[1000.0, 840.0, 700.0, 340.0]" in str(error.value)


def test_pseudo_huber_and_the_temporal_term_on_hand_made_inputs():
    pred, target = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = (0.0 + (math.sqrt(1.25) - 0.5) + (math.sqrt(9.25) - 0.5)) / 3
    assert pseudo_huber(pred, target, 0.5).item() == pytest.approx(expected, rel=1e-6)
    assert pseudo_huber(pred, target, 1e-6).item() == pytest.approx(4 / 3, rel=1e-5)  # c -> 0: mean |d|
    # a clip of 5 frames, each frame a constant: pred f^2, target 2f; differences of frames 3 apart: f = 0, 1
    frames = torch.arange(5.0)
    clip = lambda values: values[None, :, None, None, None].expand(1, 5, 2, 3, 3)  # noqa: E731
    got = temporal_loss(clip(frames ** 2), clip(2 * frames), 3)
    assert got.item() == pytest.approx(((9 - 6) ** 2 + (15 - 6) ** 2) / 2)  # (9-0 vs 6-0), (16-1 vs 8-2)
    assert temporal_loss(clip(frames)[:, :3], clip(frames)[:, :3], 3).item() == 0  # fewer frames than the gap


# ---------------------------------------------------------------------------- the two experts
@pytest.mark.parametrize("stage_step", [0, 1])
def test_each_stage_trains_only_its_experts_parameters(stage_step):
    cfg = tiny("method.semantic_steps=1", "ema_start_step=0")
    method = build_method(cfg, CPU)
    loss, logs = method.generator_loss(batch_of(cfg, method, stage_step))
    loss.backward()
    grads = {n: p.grad for n, p in method.generator.named_parameters()}
    detail = {n for n in grads if is_detail(n)}
    assert {n.split(".")[1] for n in detail if n.startswith("detail.")} == {"time_embedder", "time_proj", "proj_out"}
    assert any(".lora_A." in n for n in detail) and any("attn1.to_q" in n for n in detail)
    if stage_step == 0:  # semantic: the DiT's own weights, none of the detail expert's
        assert logs["detail_stage"] == 0.0 and "temporal_loss" in logs
        assert all(grads[n] is None for n in detail)
        assert all(g is not None for n, g in grads.items() if n not in detail)
    else:  # detail: its LoRA, time embedding and output projection copies only
        assert logs["detail_stage"] == 1.0 and "gan_generator_loss" in logs and "feature_loss" in logs
        assert all(grads[n] is None for n in grads if n not in detail)
        assert all(grads[n] is not None for n in detail)
        for part in ("lora_B", "detail.time_embedder", "detail.time_proj", "detail.proj_out"):
            assert any(grads[n].abs().sum() > 0 for n in detail if part in n), part
    assert all(p.grad is None for p in method.real_score.parameters())


def two_experts(seed: int = 0) -> DualExpertDiT:
    """A tiny DualExpertDiT whose detail expert differs from its semantic one (trained-looking LoRA and copies)."""
    from model.dcm import _backbone

    cfg = DCMConfig(timestep_shift=5.0, num_frame_per_block=6, num_training_frames=6, detail={"rank": 4, "alpha": 8})
    torch.manual_seed(seed)
    net = DualExpertDiT(**_backbone(compose_config())).add_detail_expert(cfg.boundary_timestep, cfg.detail).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if is_detail(name):
                p.add_(0.1 * torch.randn_like(p))
    return net


def test_the_switch_picks_the_expert_by_timestep_per_sample_and_frame():
    net = two_experts()
    b = net.boundary_timestep
    x, ctx = torch.randn(2, 6, 3, 8, 8), torch.randn(2, 8, 32)
    t = torch.tensor([[b + 30.0] * 6, [b] * 3 + [b - 200.0] * 3])  # sample 0 semantic; sample 1 detail at / below b
    with torch.no_grad():
        mixed = net(x, t, ctx)
        semantic, detail = net(x, t, ctx, expert="semantic"), net(x, t, ctx, expert="detail")
        by_sample = net(x, torch.tensor([b + 30.0, b - 1.0]), ctx)  # [B] timesteps
        assert not torch.allclose(semantic, detail, atol=1e-3)
        assert torch.equal(mixed[0], semantic[0]) and torch.equal(mixed[1], detail[1])
        assert torch.equal(by_sample[0], net(x, torch.full((2,), b + 30.0), ctx, expert="semantic")[0])
        assert torch.equal(by_sample[1], net(x, torch.full((2,), b - 1.0), ctx, expert="detail")[1])
        # the semantic expert is the DiT itself: a plain WanDiT with its weights gives the same flow
        plain = WanDiT(**net.config)
        load_strict(plain, net.semantic_state_dict())
        assert torch.allclose(plain(x, t, ctx)[0], semantic[0], atol=1e-6)
        # frames mix too: the first half of sample 1 at b + 30 is semantic, its second half detail
        frames = net(x, torch.tensor([[b + 30.0] * 6, [b + 30.0] * 3 + [b - 200.0] * 3]), ctx)
        assert not torch.allclose(frames[1], detail[1], atol=1e-3) and not torch.allclose(frames[1], semantic[1], atol=1e-3)


def test_inference_is_euler_along_each_steps_expert():
    net = two_experts(1)
    schedule = FlowSchedule(5.0, renoise="implied")
    steps = schedule.denoising_steps([1000, 850, 700, 350], True)  # DCM's default list: 1000, 966.2 semantic; 921.1, 729.0 detail
    as_passed = [float(torch.tensor(t)) for t in steps]  # float32, as the rollout passes timesteps
    assert [t > net.boundary_timestep for t in as_passed] == [True, True, False, False]
    assert as_passed[2] == net.boundary_timestep  # 700 warped is the boundary: the detail expert's first step
    noise, ctx = torch.randn(2, 6, 3, 8, 8), torch.randn(2, 8, 32)
    with torch.no_grad():
        video = rollout(net, noise, ctx, steps, CausalPattern(6), schedule=schedule).video
        x = noise
        for i, t in enumerate(steps):  # a hand-made loop: each step's expert, an Euler step to the next
            v = net(x, torch.full((2, 6), t), ctx, expert="detail" if as_passed[i] <= net.boundary_timestep else "semantic")
            x = x + ((steps[i + 1] if i + 1 < len(steps) else 0.0) - t) / 1000 * v
    assert torch.allclose(video, x, atol=2e-5), (video - x).abs().max()
    with torch.no_grad():  # fresh re-noising (Self Forcing's sampler) gives other clips
        fresh = rollout(net, noise, ctx, steps, CausalPattern(6), schedule=FlowSchedule(5.0), rng=torch.Generator())
    assert not torch.allclose(fresh.video, x, atol=1e-3)


# ---------------------------------------------------------------------------- runs: export, inference, resume
def run(tmp_path: Path, name: str, *overrides: str) -> Path:
    cfg = tiny(*overrides)
    train.train(cfg, tmp_path / name)
    return tmp_path / name


# θ⁻ as its own EMA: resumed runs must restore it (a state network) and its fold count
BOTH = ("method.semantic_steps=2", "max_steps=4", "checkpoint.every=1", "logger.every=1", "method.target_decay=0.5")


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    return run(tmp_path_factory.mktemp("dcm"), "straight", *BOTH)


def test_both_resumes_mid_stage_to_the_same_weights(straight, tmp_path):
    run(tmp_path, "resumed", *BOTH, "max_steps=1")  # stopped in the semantic stage
    run(tmp_path, "resumed", *BOTH, "max_steps=3", "resume=latest")  # ... and in the detail stage
    resumed = run(tmp_path, "resumed", *BOTH, "resume=latest")
    a = checkpoint_tensors(straight / "checkpoints" / "step_000004", tmp_path)
    b = checkpoint_tensors(resumed / "checkpoints" / "step_000004", tmp_path)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    # the stages: steps 0-1 move the semantic expert, steps 2-3 the detail expert and the discriminator
    steps = {s: checkpoint_tensors(straight / "checkpoints" / f"step_{s:06d}", tmp_path) for s in (1, 2)}
    gen = lambda t, detail: {k: v for k, v in t.items() if k.startswith(".generator.") and is_detail(k[11:]) == detail}  # noqa: E731
    changed = lambda x, y: any(not torch.equal(x[k], y[k]) for k in x)  # noqa: E731
    assert changed(gen(steps[1], False), gen(steps[2], False)) and not changed(gen(steps[1], True), gen(steps[2], True))
    assert not changed(gen(steps[2], False), gen(a, False)) and changed(gen(steps[2], True), gen(a, True))
    disc = lambda t: {k: v for k, v in t.items() if k.startswith(".discriminator.")}  # noqa: E731
    assert changed(disc(steps[2]), disc(a)) and not changed(disc(steps[1]), disc(steps[2]))
    # every optimizer state exists from the start at its fresh value: the discriminator's step counts are 0
    # until the detail stage, then 2
    counts = lambda t: {v.item() for k, v in t.items() if k.startswith(".discriminator_optim.state.") and k.endswith(".step")}  # noqa: E731
    assert counts(steps[2]) == {0.0} and counts(a) == {2.0}
    rows = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [("discriminator_loss" in r, "temporal_loss" in r) for r in rows if "generator_loss" in r] == \
        [(False, True), (False, True), (True, False), (True, False)]


def test_the_export_holds_both_experts_and_the_adapter_file_loads_back(straight, tmp_path):
    export = straight / "checkpoints" / "step_000004" / "export"
    config = json.loads((export / "config.json").read_text())
    weights = load_file(str(export / "model.safetensors"))
    net = DCM.inference_generator(config["backbone"], config["method"])
    load_strict(net, weights)  # both experts, every tensor
    assert isinstance(net, DualExpertDiT) and any(k.startswith("detail.") for k in weights)
    adapter = load_file(str(export / "adapter_model.safetensors"))
    assert adapter.keys() == {k.replace(".default.", ".") for k in weights if ".lora_" in k}
    # peft loads the adapter onto the semantic expert: the merged attention weights are base + (alpha / r) B A
    semantic = WanDiT(**config["backbone"])
    load_strict(semantic, net.semantic_state_dict())
    merged = load_adapter(semantic, export)
    key = "blocks.1.attn1.to_v"
    a, b = weights[f"{key}.lora_A.default.weight"], weights[f"{key}.lora_B.default.weight"]
    expected = weights[f"{key}.base_layer.weight"] + 2.0 * b @ a
    assert b.abs().sum() > 0 and torch.allclose(merged.state_dict()[f"{key}.weight"], expected, atol=1e-6)
    # ... and with the detail expert's own time embedding and output projection, it is the detail expert
    with torch.no_grad():
        embedder = merged.condition_embedder
        for name, module in (("time_embedder", embedder.time_embedder), ("time_proj", embedder.time_proj),
                             ("proj_out", merged.proj_out)):
            module.load_state_dict(net.detail[name].state_dict())
        x, t, ctx = torch.randn(2, 6, 3, 8, 8), torch.full((2, 6), 500.0), torch.randn(2, 8, 32)
        assert torch.allclose(merged.eval()(x, t, ctx), net.eval()(x, t, ctx), atol=1e-5)


def test_an_expert_the_mode_never_trains_stays_out_of_the_optimizer_but_not_the_export(tmp_path):
    from engine.trainer import Trainer
    from utils.distributed import destroy, init_distributed, single_process_group

    cfg = tiny("method.mode=semantic", "max_steps=1", "checkpoint.every=0")
    dist = init_distributed()
    own_group = single_process_group(dist)
    try:
        trainer = Trainer(cfg, tmp_path / "semantic", dist)
        trained = {id(p) for group in trainer.optimized["generator"].optimizer.param_groups for p in group["params"]}
        named = dict(trainer.method.generator.named_parameters())
        assert {n for n, p in named.items() if id(p) in trained} == {n for n in named if not is_detail(n)}
        assert set(trainer.emas["generator"].shadow) == {n for n in named if not is_detail(n)}
        trainer.run()
    finally:
        if own_group:
            destroy()
    weights = load_file(str(tmp_path / "semantic" / "checkpoints" / "step_000001" / "export" / "model.safetensors"))
    assert weights.keys() == trainer.method.generator.state_dict().keys()  # the untrained detail expert too


def test_inference_py_runs_a_dcm_export_as_training_evaluated_it(straight, tmp_path):
    from engine.evaluation import sample
    from tests.test_inference import infer, latents

    prompts = ["a red circle moving left", "a blue square moving up"]
    index = infer(tmp_path / "out", f"checkpoint={straight}", f"prompts={prompts}", "seed=7", "batch_size=2",
                  "save_latents=true")
    method = build_method(tiny(*BOTH), CPU)
    export = straight / "checkpoints" / "step_000004" / "export"
    load_strict(method.generator, load_file(str(export / "model.safetensors")))
    expected = sample(method, method.generator.eval(), prompts, 6, seed=7)
    assert method.schedule.renoise == "implied" and index["weights"] == "ema"
    assert torch.equal(latents(tmp_path / "out", index).clamp(-1, 1), expected)


def test_the_detail_stage_counts_only_its_own_discriminator_updates():
    cfg = tiny("method.semantic_steps=3", "max_steps=10")
    method = build_method(cfg, CPU)
    assert updates_of(cfg, DCM.phases, "discriminator", method) == 7
    assert updates_of(cfg, DCM.phases, "generator", method) == 10


# ---------------------------------------------------------------------------- Wan: one step of each stage
def test_one_step_of_each_stage_on_the_tiny_wan_folder(tiny_wan_folder, tmp_path):  # noqa: F811
    from scripts.bench_train import write_random_latents

    overrides = wan_overrides(tiny_wan_folder, "model.text_encoder.text_len=16", "method.gan.blocks=[0,1]",
                              "method.mode=both", "method.semantic_steps=1", "method.detail.rank=4",
                              "method.detail.alpha=8", "method.euler_steps=10", "logger.every=1",
                              "method.denoising_step_list=[1000,700]",  # the boundary (0.7) is a step
                              f"data.videos.path={tmp_path / 'latents'}", preset="dcm_wan")
    cfg = compose_config(*overrides, tiny=False)
    write_random_latents(cfg, 2, tmp_path / "latents")
    validate(cfg)
    train.train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["detail_stage"] for r in rows] == [0.0, 1.0]
    assert "temporal_loss" in rows[0] and "discriminator_loss" not in rows[0]
    assert {"gan_generator_loss", "feature_loss", "discriminator_loss"} <= set(rows[1])
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert (tmp_path / "run" / "checkpoints" / "step_000002" / "export" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides, message", [
    (("method.mode=fast",), "method.mode='fast': expected one of ('semantic', 'fine', 'both')"),
    (("method.boundary=1.0",), "method.boundary must be in (0, 1)"),
    (("method.boundary=0",), "method.boundary must be in (0, 1)"),
    (("method.multiphase=0",), "method.multiphase must be >= 1, got 0"),
    (("method.multiphase=16",), "method.multiphase=16 is more phases than an expert has Euler steps (semantic 15"),
    (("method.semantic_steps=0",), "method.semantic_steps must be >= 1 with method.mode=both"),
    (("method.boundary=0.999",), "rounds to 50, leaving an expert no Euler step"),
    (("method.target_decay=1.0",), "method.target_decay must be in [0, 1)"),
    (("method.multiphase=2",), "method.denoising_step_list=[1000, 850, 700, 350] misses the upper end of a phase"),
    (("method.boundary=0.5",), "misses the upper end of a phase ([500.0]: grid points [25]"),
])
def test_bad_settings_fail_at_validation_in_one_line(overrides, message):
    with pytest.raises(ValueError) as error:
        validate(compose_config(*FAST, *overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("overrides, message", [
    (("method.mode=fine",), "method.mode=fine trains the detail expert on a semantic expert, but model.generator_init is null"),
    (("method.detail.targets=[to_k]",), "method.detail.targets: 'to_k' reaches blocks.0.attn2.to_k"),
    (("method.detail.targets=[attn1.to_x]",), "method.detail.targets: 'attn1.to_x' names no module"),
    (("model.lora.generator.rank=4",), "model.lora.generator.rank=4: DCM's detail expert is its own LoRA"),
])
def test_bad_experts_fail_when_built_in_one_line(overrides, message):
    cfg = tiny(*overrides)
    with pytest.raises(ValueError) as error:
        build_method(cfg, CPU)
    assert message in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------------------- GPU: memory and step time at Wan size
@pytest.mark.gpu
def test_semantic_and_detail_steps_at_wan_size_against_dmd(tmp_path):
    """One H200 / H100, random Wan2.1-1.3B weights, bf16, 21 latent frames at 832x480, batch 1 per GPU: step time
    and peak memory of a DCM semantic step (mode=both before its switch) and a detail step (mode=fine on the random
    weights as its semantic expert), each run with its discriminator's step, next to self-forcing DMD's generator
    and critic steps (its preset as it is). Peak: over the run's steps, each run its own process."""
    import subprocess
    import sys

    from tests.test_gan_wan import REPO, write_prompts

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    folder = tmp_path / "wan-1.3b-random"
    subprocess.run([sys.executable, "scripts/make_random_wan_folder.py", str(folder)], cwd=REPO, check=True)
    dcm = ["--random-latents", "8", "data=latents", "experiment=dcm_wan", f"model.path={folder}", "batch_size=1"]
    runs = {
        "self_forcing_dmd": ["--exit-steps", "0,1,2,3", f"data.prompts.path={write_prompts(tmp_path)}",
                             "experiment=self_forcing_dmd", f"model.path={folder}"],
        "dcm_semantic": [*dcm, "method.mode=both", "method.semantic_steps=1000000"],
        "dcm_detail": [*dcm, "method.mode=fine", f"model.generator_init={folder}"],
    }
    rows = {}
    for name, args in runs.items():
        out = tmp_path / f"{name}.json"
        subprocess.run([sys.executable, "scripts/bench_train.py", "--steps", "4", "--warmup", "4", "--out", str(out), *args],
                       cwd=REPO, check=True)
        r = json.loads(out.read_text())
        first, second = ("generator", "critic") if name == "self_forcing_dmd" else ("generator", "discriminator")
        mean = "_step_s_mean_over_exit_steps" if name == "self_forcing_dmd" else "_step_s"
        rows[name] = (r[first + mean], r[second + mean], r["peak_allocated_gib_per_gpu"][0])
    lines = [f"{torch.cuda.get_device_name()}: generator step s / critic or discriminator step s / peak allocated GiB"]
    lines += [f"{name:18s} {g:.2f}  {c:.2f}  {peak:.1f}" for name, (g, c, peak) in rows.items()]
    print("\n" + "\n".join(lines))
    (tmp_path / "dcm_memory.txt").write_text("\n".join(lines) + "\n")
    # DCM's selling point: no critic (a second 1.3B network with its AdamW state)
    assert rows["dcm_semantic"][2] < rows["self_forcing_dmd"][2] and rows["dcm_detail"][2] < rows["self_forcing_dmd"][2]
