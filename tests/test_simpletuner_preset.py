"""experiment=simpletuner_dmd_3step (docs/simpletuner.md): SimpleTuner's DMD quickstart values, composed as a user
would, then built at tiny size on the random Wan folder with its int8 teacher and text encoder and LoRA networks,
and the score timesteps unshifted (score_timestep_shift 1) while the student's steps stay warped by shift 5."""

import torch

from engine.build import build_method
from engine.config import validate
from tests.test_wan_training import wan_config
from tests.train_setup import compose_config
from tests.wan_folder import tiny_wan_folder  # noqa: F401  (session fixture)


def test_the_preset_holds_the_quickstarts_values():
    cfg = compose_config("experiment=simpletuner_dmd_3step", tiny=False)
    m = cfg.method
    assert list(m.denoising_step_list) == [1000, 757, 522] and m.warp_denoising_step and m.timestep_shift == 5.0
    assert m.score_timestep_shift == 1.0 and m.ts_schedule and not m.ts_schedule_max
    assert (m.min_step_ratio, m.max_step_ratio, m.guidance_scale, m.fake_guidance_scale) == (0.02, 0.98, 3.0, 0.0)
    assert (m.num_frame_per_block, m.num_training_frames, m.same_step_across_blocks) == (3, 21, False)
    lora = cfg.model.lora
    assert (lora.generator.rank, lora.generator.alpha, lora.critic.rank, lora.critic.alpha) == (128, 128, 128, 128)
    assert (str(cfg.model.precision.teacher), str(cfg.model.precision.text_encoder)) == ("int8", "int8")
    critic = cfg.optim.critic
    assert (critic.lr, list(critic.betas), critic.grad_clip, critic.weight_decay, critic.eps) == (1e-5, [0.9, 0.999], 1.0, 0.01, 1e-8)
    generator = cfg.optim.generator
    assert (generator.lr, generator.grad_clip, generator.warmup_steps, str(generator.schedule)) == (2e-5, 1.0, 100, "cosine")
    assert (cfg.dfake_gen_update_ratio, cfg.max_steps, cfg.seed, cfg.batch_size, cfg.total_batch_size) == (1, 4000, 1000, 1, None)
    assert (cfg.checkpoint.every, cfg.checkpoint.keep, cfg.eval.every, list(cfg.eval.seeds)) == (200, 3, 200, [42])
    assert str(cfg.model.dtype) == "bfloat16" and cfg.model.gradient_checkpointing


def test_the_preset_builds_and_its_score_timesteps_are_unshifted(tiny_wan_folder):  # noqa: F811
    cfg = wan_config(tiny_wan_folder, "method.denoising_step_list=[1000,757,522]", preset="simpletuner_dmd_3step")
    validate(cfg)
    method = build_method(cfg, torch.device("cpu"))
    assert type(method.real_score.blocks[0].attn1.to_q.weight).__name__ == "Int8Tensor"
    assert all(type(m.weight).__name__ == "Int8Tensor" for m in method.text_encoder.modules() if isinstance(m, torch.nn.Linear))
    for net in (method.generator, method.fake_score):
        trained = [n for n, p in net.named_parameters() if p.requires_grad]
        assert trained and all(".lora_" in n for n in trained)
        assert net.blocks[0].attn1.to_q.lora_A["default"].weight.shape[0] == 128
    # the student's steps warped by shift 5 (1000, 757, 522 -> about 1000, 940, 845), the score timesteps not
    assert [round(float(s)) for s in method.steps] == [1000, 940, 845]
    method.reseed(0, 0, "critic", list(range(64)))
    u = method.rng.randint(0, 1000, (64,))
    method.reseed(0, 0, "critic", list(range(64)))
    t = method.score_timestep(64, 2, None)
    assert torch.equal(t[:, 0], u.float().clamp(20, 980)) and torch.equal(t[:, 0], t[:, 1])
