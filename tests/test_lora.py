"""LoRA students and critics (model.lora.<network>, engine/lora.py) on the tiny toy world: only the adapters
train (base bit-identical, optimizer and EMA hold adapters only), resume is bit-exact, the adapter export
loads with peft onto a fresh base and gives the trained model's outputs, the merged export equals the
adapter applied, inference.py loads either, a bad target is one line naming the key, a LoRA critic trains,
and 2 gloo ranks (FSDP2 over peft's layers) train as one process does."""

import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

import train
from engine.build import build_backbone, build_method
from engine.config import validate
from engine.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, add_adapters
from model.wan.transformer import WanDiT
from tests.dist_setup import spawn_ranks
from tests.test_fsdp_training import RTOL, assert_close_losses, losses
from tests.test_inference import infer, latents
from tests.test_train import checkpoint_tensors
from tests.train_setup import compose_config
from utils.checkpoint import CheckpointManager
from utils.ema import EMA

# alpha 8: a scale of 2, which every loader must read from the export (1 would be alpha's default)
LORA = ("model.lora.generator.rank=4", "model.lora.generator.alpha=8", "ema_start_step=0", "logger.every=1")  # EMA of the updates at steps 0 and 2
COMMON = ("max_steps=4", "checkpoint.every=2")
STEP = Path("checkpoints") / "step_000004"


def run(run_dir: Path, *overrides: str) -> Path:
    cfg = compose_config(*overrides)
    validate(cfg)
    train.train(cfg, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A base file; 4 steps straight (exporting merged weights too); 2 steps, then resumed to 4 (adapter only)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(1)
    save_file(build_backbone(compose_config(), None).state_dict(), str(root / "base.safetensors"))
    lora = (*LORA, f"model.generator_init={root / 'base.safetensors'}")
    run(root / "straight", *lora, *COMMON, "model.lora.export_merged=true")
    run(root / "resumed", *lora, "max_steps=2")
    run(root / "resumed", *lora, *COMMON, "resume=latest")
    yield root
    torch.set_num_threads(threads)


def test_only_the_adapters_train(runs, tmp_path):
    base = load_file(str(runs / "base.safetensors"))
    first = checkpoint_tensors(runs / "straight" / "checkpoints" / "step_000002", tmp_path)
    last = checkpoint_tensors(runs / "straight" / STEP, tmp_path)
    generator = {k.removeprefix(".generator."): v for k, v in last.items() if k.startswith(".generator.")}
    frozen = {k.replace(".base_layer", ""): v for k, v in generator.items() if ".lora_" not in k}
    adapters = sorted(k for k in generator if ".lora_" in k)
    assert frozen.keys() == base.keys() and len(adapters) == 2 * 2 * 2 * 4  # A, B x 2 attentions x 2 blocks x q k v o
    assert all(torch.equal(frozen[k], base[k]) for k in base)  # the base is bit-identical after training
    # lora_B starts at 0 (peft's init); the 2nd update (step 2) moves lora_A too, as B is no longer 0
    assert all(generator[k].abs().max() > 0 for k in adapters if ".lora_B." in k)
    assert all(not torch.equal(first[".generator." + k], generator[k]) for k in adapters)
    optimized = {k.split(".", 3)[3].rsplit(".", 1)[0] for k in last if k.startswith(".generator_optim.state.")}
    averaged = {k.removeprefix(".ema.shadow.") for k in last if k.startswith(".ema.shadow.")}
    assert optimized == averaged == set(adapters)  # AdamW and the EMA hold the adapters only
    assert any(not torch.equal(last[".ema.shadow." + k], generator[k]) for k in adapters)  # a real average


def test_resume_equals_uninterrupted_training(runs, tmp_path):
    a = checkpoint_tensors(runs / "straight" / STEP, tmp_path)
    b = checkpoint_tensors(runs / "resumed" / STEP, tmp_path)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    exports = [runs / name / STEP / "export" for name in ("straight", "resumed")]
    assert sorted(p.name for p in exports[0].iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, "config.json", "model.safetensors"])
    assert sorted(p.name for p in exports[1].iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, "config.json"])
    adapter = [load_file(str(e / ADAPTER_WEIGHTS)) for e in exports]
    assert adapter[0].keys() == adapter[1].keys() and all(torch.equal(adapter[0][k], adapter[1][k]) for k in adapter[0])


def trained_generator(runs: Path) -> WanDiT:
    """The generator training exported: base and adapters from the DCP state, the EMA's adapters swapped in."""
    cfg = compose_config(*LORA)
    generator = build_backbone(cfg, None)
    add_adapters(generator, cfg.model.lora.generator, "generator")
    ema = EMA(generator, 0.99)
    CheckpointManager(runs / "straight", keep=0).load(runs / "straight" / STEP, {"generator": generator, "ema": ema})
    ema.copy_to(generator)
    return generator.eval()


def outputs(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 6, 3, 8, 8, generator=g), torch.randn(2, 8, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([[500.0] * 6, [250.0] * 6]), context)


def peft_loaded(runs: Path) -> WanDiT:
    """The adapter export loaded as peft loads one onto a fresh base (diffusers' load_lora_adapter does the same)."""
    export = runs / "straight" / STEP / "export"
    base = build_backbone(compose_config(), None)
    base.load_state_dict(load_file(str(runs / "base.safetensors")))
    model = inject_adapter_in_model(LoraConfig.from_pretrained(str(export)), base)
    result = set_peft_model_state_dict(model, load_file(str(export / ADAPTER_WEIGHTS)))
    assert not result.unexpected_keys and not [k for k in result.missing_keys if ".lora_" in k]
    return model.eval()


def test_adapter_export_loads_with_peft_and_gives_the_trained_outputs(runs):
    trained, loaded = outputs(trained_generator(runs)), outputs(peft_loaded(runs))
    error = (trained - loaded).abs().max().item()
    print(f"adapter export vs trained generator: max abs error {error:.3e} (outputs up to {trained.abs().max():.2f})")
    assert error == 0.0  # the same weights through the same layers
    diffusers = build_backbone(compose_config(), None)  # a WanTransformer3DModel: diffusers' own loader
    diffusers.load_state_dict(load_file(str(runs / "base.safetensors")))
    diffusers.load_lora_adapter(str(runs / "straight" / STEP / "export"), weight_name=ADAPTER_WEIGHTS, prefix=None)
    assert torch.equal(outputs(diffusers.eval()), loaded)


def test_merged_export_equals_the_adapter_applied(runs):
    merged = build_backbone(compose_config(), None)
    merged.load_state_dict(load_file(str(runs / "straight" / STEP / "export" / "model.safetensors")))  # strict
    adapted, folded = outputs(peft_loaded(runs)), outputs(merged.eval())
    error = (adapted - folded).abs().max().item()
    print(f"merged export vs adapter applied: max abs error {error:.3e} (outputs up to {adapted.abs().max():.2f})")
    assert error < 1e-5  # fp32 rounding of W + s B A against W x + s B (A x)


def test_inference_loads_the_merged_or_the_adapter_export(runs, tmp_path):
    prompts = "prompts=[a red circle moving left,a blue square moving up]"
    merged = infer(tmp_path / "merged", f"checkpoint={runs / 'straight'}", prompts, "save_latents=true")
    adapter = infer(tmp_path / "adapter", f"checkpoint={runs / 'resumed'}", prompts, "save_latents=true")
    assert merged["checkpoint"].endswith("model.safetensors") and adapter["checkpoint"].endswith(ADAPTER_WEIGHTS)
    error = (latents(tmp_path / "merged", merged) - latents(tmp_path / "adapter", adapter)).abs().max().item()
    print(f"inference, merged vs adapter export: max abs error {error:.3e}")
    assert error < 1e-5
    raw = infer(tmp_path / "raw", f"checkpoint={runs / 'resumed' / STEP}", prompts, "use_ema=false")
    assert raw["weights"] == "generator"  # the DCP state's base and adapters, merged
    with pytest.raises(ValueError, match=r"a LoRA adapter without its base weights, and model.generator_init is null"):
        infer(tmp_path / "nobase", f"checkpoint={runs / 'resumed'}", prompts, "model.generator_init=null",
              groups=["model.generator_init=null"])
    with pytest.raises(FileNotFoundError, match=r"model.generator_init='/nowhere.safetensors', the base weights"):
        infer(tmp_path / "gone", f"checkpoint={runs / 'resumed'}", prompts, "model.generator_init=/nowhere.safetensors",
              groups=["model.generator_init=/nowhere.safetensors"])


def test_bad_lora_settings_are_one_line_errors_naming_the_key():
    with pytest.raises(ValueError) as error:
        build_method(compose_config("model.lora.generator.rank=4", "model.lora.generator.targets=[to_q,to_qq]"),
                     torch.device("cpu"))
    print(error.value)
    assert str(error.value).startswith("model.lora.generator.targets: 'to_qq' names no module of the generator")
    assert "\n" not in str(error.value) and "'attn1.to_q'" in str(error.value)
    with pytest.raises(ValueError, match=r"^model.lora.generator.targets: 'attn1' names a WanAttention, not a linear layer, of the generator"):
        build_method(compose_config("model.lora.generator.rank=4", "model.lora.generator.targets=[attn1]"),
                     torch.device("cpu"))
    with pytest.raises(ValueError, match=r"^model.lora.critic.rank=4: ODERegression trains no network 'critic'"):
        validate(compose_config("method=ode_regression", "model.lora.critic.rank=4"))
    with pytest.raises(ValueError, match=r"^model.lora.generator.rank must be >= 0"):
        validate(compose_config("model.lora.generator.rank=-1"))


def test_a_lora_critic_trains_its_adapters_only(tmp_path):
    run_dir = run(tmp_path / "critic", "model.lora.critic.rank=4", "model.lora.critic.targets=[to_q,to_v,ffn.net.2]",
                  "max_steps=3", "checkpoint.every=1")  # the generator updates at steps 0 and 2, the critic at each
    first, last = (checkpoint_tensors(run_dir / "checkpoints" / f"step_00000{s}", tmp_path) for s in (1, 3))
    critic = [k for k in last if k.startswith(".critic.")]
    adapters = [k for k in critic if ".lora_" in k]
    assert len(adapters) == 2 * 2 * (2 * 2 + 1)  # A, B x 2 blocks x (q, v of both attentions + the FFN's output)
    assert all(torch.equal(first[k], last[k]) for k in critic if k not in adapters)
    assert all(not torch.equal(first[k], last[k]) for k in adapters)
    assert {k.split(".", 3)[3].rsplit(".", 1)[0] for k in last if k.startswith(".critic_optim.state.")} == \
        {k.removeprefix(".critic.") for k in adapters}
    assert any(not torch.equal(first[k], last[k]) for k in last if k.startswith(".generator."))  # full fine-tuning


def test_without_ema_the_export_is_the_generators_adapter(tmp_path):
    run_dir = run(tmp_path / "noema", "model.lora.generator.rank=2", "ema_weight=0", "max_steps=1",
                  "model.lora.export_merged=true")
    export = run_dir / "checkpoints" / "step_000001" / "export"
    state = checkpoint_tensors(run_dir / "checkpoints" / "step_000001", tmp_path)
    adapter = load_file(str(export / ADAPTER_WEIGHTS))
    assert adapter.keys() == {k.removeprefix(".generator.").replace(".default", "") for k in state if ".lora_" in k
                              and k.startswith(".generator.")}
    assert all(torch.equal(adapter[k], state[".generator." + k.replace(".weight", ".default.weight")]) for k in adapter)
    build_backbone(compose_config(), None).load_state_dict(load_file(str(export / "model.safetensors")))  # strict


def _worker(rank, world, port, run_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run(Path(run_dir), *LORA, "model.lora.critic.rank=4", "batch_size=1", *COMMON, "model.lora.export_merged=true")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_train_lora_networks_as_one_process(tmp_path):
    """fully_shard per block over peft's layers: frozen and trained parameters in one FSDP unit."""
    spawn_ranks(_worker, 2, str(tmp_path / "two"))
    one = run(tmp_path / "one", *LORA, "model.lora.critic.rank=4", "batch_size=2", *COMMON, "model.lora.export_merged=true")
    assert_close_losses(losses(tmp_path / "two"), losses(one), [1, 2, 3, 4])
    for name in (ADAPTER_WEIGHTS, "model.safetensors"):
        a, b = (load_file(str(d / STEP / "export" / name)) for d in (tmp_path / "two", one))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=RTOL, atol=1e-6) for k in a), name
