"""The engine's contract and layers: a method defined here (not in model/) trains, resumes and exports
with no engine change; the import rules hold; ranks agree on one run directory; every config default
is stated once."""

import ast
import datetime
import json
import os
import runpy
import sys
from dataclasses import MISSING as MISSING_FIELD
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path

import pytest
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import train
from engine.config import TrainSchema, method_class, validate
from model.base import MethodConfig
from model.contract import Network, Phase
from model.dmd import DMD
from tests.dist_setup import spawn_ranks
from tests.test_train import checkpoint_tensors
from tests.train_setup import CONFIGS, compose_config

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- a method of the test's own
class Head(torch.nn.Module):
    """A small trained network of the method's own: a linear read-out of a clip (like a discriminator head)."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = torch.nn.Linear(channels, 1)

    def forward(self, video: torch.Tensor) -> torch.Tensor:  # [B, F, C, H, W] -> [B]
        return self.proj(video.mean(dim=(1, 3, 4))).sum(dim=-1)


def build_head(cfg, built: dict) -> torch.nn.Module:
    return Head(cfg.model.latent_shape[0])


class HeadedDMD(DMD):
    """DMD plus a third trained network with its own optimizer and phase, every second step."""

    networks = {**DMD.networks, "head": Network("head", build=build_head, trained=True)}
    phases = (*DMD.phases, Phase("head", "head_loss", ("head",), every=2))

    def head_loss(self, batch: dict):
        with torch.no_grad():
            video, _, _ = self.generate(batch)
        target = self.rng.randn((video.shape[0],))  # a draw keyed by (seed, step, phase, sample): resumable
        loss = torch.nn.functional.mse_loss(self.head(video).float(), target)
        return loss, {"head_loss": loss.detach()}


ConfigStore.instance().store(group="method", name="headed_test", node={"defaults": ["dmd", "_self_"],
                                                                       "_target_": f"{__name__}.HeadedDMD"})


def test_a_method_defined_outside_model_trains_resumes_and_exports(tmp_path):
    common = ("method=headed_test", "+optim.head.lr=1e-2", "max_steps=3", "dfake_gen_update_ratio=1",
              "checkpoint.every=2", "checkpoint.keep=0", "logger.every=1")
    straight = tmp_path / "straight"
    cfg = compose_config(*common)
    validate(cfg)
    train.train(cfg, straight)
    half = tmp_path / "resumed"
    train.train(compose_config(*common[:2], "max_steps=2", *common[3:]), half)
    train.train(compose_config(*common, "resume=latest"), half)

    meta = json.loads((straight / "checkpoints" / "step_000003" / "meta.json").read_text())
    assert {"head", "head_optim", "head_sched", "generator", "critic", "ema"} <= set(meta["modules"] + meta["optimizers"]
                                                                                   + meta["stateful"])
    a = checkpoint_tensors(straight / "checkpoints" / "step_000003", tmp_path)
    b = checkpoint_tensors(half / "checkpoints" / "step_000003", tmp_path)
    assert a.keys() == b.keys() and any(k.startswith(".head.") for k in a)
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    # the head trained: its weights moved at steps 0 and 2 (every=2), with its own learning rate
    first = checkpoint_tensors(straight / "checkpoints" / "step_000002", tmp_path)
    assert any(not torch.equal(first[k], a[k]) for k in a if k.startswith(".head."))
    rows = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    head_steps = [r["step"] for r in rows if "head_loss" in r]
    assert head_steps == [1, 3]  # phases at steps 0 and 2, logged after them
    export = straight / "checkpoints" / "step_000003" / "export"
    assert (export / "model.safetensors").is_file()
    assert json.loads((export / "config.json").read_text())["method"]["_target_"] == f"{__name__}.HeadedDMD"


def test_a_bad_declaration_is_refused_at_class_definition():
    with pytest.raises(ValueError, match="phase 'head' updates \\['nope'\\]"):
        type("Bad", (DMD,), {"phases": (*DMD.phases, Phase("head", "generator_loss", ("nope",)))})
    with pytest.raises(ValueError, match="trained networks \\['head'\\] are updated by no phase"):
        type("Idle", (DMD,), {"networks": {**DMD.networks, "head": Network("head", build=build_head, trained=True)}})
    with pytest.raises(ValueError, match="calls 'missing_loss'"):
        type("NoLoss", (DMD,), {"phases": (Phase("generator", "missing_loss", ("generator",)), DMD.phases[1])})


# ---------------------------------------------------------------------------- config
def test_renamed_and_unknown_keys_name_what_to_use():
    with pytest.raises(ValueError, match=r"generator_optim.lr was renamed: use optim.generator.lr"):
        validate(compose_config("generator_optim.lr=1e-5"))
    with pytest.raises(ValueError, match=r"critic_optim.betas was renamed: use optim.critic.betas"):
        validate(compose_config("critic_optim.betas=[0.9,0.99]"))
    with pytest.raises(Exception, match="sid_alpha"):  # DMD has no such knob: Hydra refuses the override
        compose_config("method.sid_alpha=2.0")
    with pytest.raises(ValueError, match=r"method.sid_alpha: Key 'sid_alpha' not in 'MethodConfig' \(DMD takes"):
        validate(compose_config("+method.sid_alpha=2.0"))
    with pytest.raises(ValueError, match=r"method.guidance_scale: .*could not be converted to Float"):
        validate(compose_config("method.guidance_scale=lots"))
    with pytest.raises(ValueError, match=r"optim.head: DMD trains no network 'head'"):
        validate(compose_config("+optim.head.lr=1e-3"))
    for key, value in (("model.dtype", "float16"), ("optim.generator.schedule", "linear"), ("logger.mode", "on"),
                       ("device", "gpu"), ("model.checkpoint_policy.critic", "some"), ("eval.video_formats", "[avi]")):
        with pytest.raises(Exception) as error:
            compose_config(f"{key}={value}")  # enums fail at compose time, naming the key and the values
        text = f"{error.value} {error.value.__cause__}"
        assert key in text and "Invalid value" in text and "expected one of" in text, text


def test_a_phase_whose_data_the_config_lacks_is_refused_before_building():
    with pytest.raises(ValueError, match=r"CausVid's generator phase draws data.videos"):
        validate(compose_config("method=causvid", "data.videos=null"))
    with pytest.raises(ValueError, match=r"draws data.ode_pairs or data.prompts"):
        validate(compose_config("method=ode_regression", "data.prompts=null"))


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


def test_every_default_is_stated_once():
    """A key's value in configs/config.yaml equals the schema's default; a method YAML's values equal its
    config class's defaults (the toy and Wan values live in experiment presets, as deltas)."""
    schema = OmegaConf.to_container(OmegaConf.structured(TrainSchema))
    root = OmegaConf.to_container(OmegaConf.load(CONFIGS / "config.yaml"))
    root.pop("defaults"), root.pop("hydra")
    stated = dict(_leaves(root))
    defaults = dict(_leaves({k: schema[k] for k in root}))
    assert stated.keys() == defaults.keys(), set(stated) ^ set(defaults)
    assert {k: v for k, v in stated.items() if defaults[k] != v} == {}
    top = {f.name for f in fields(TrainSchema)} - {"method", "model", "data", "generator_optim", "critic_optim"}
    assert top <= set(root), top - set(root)  # every top-level knob is listed with its comment
    for path in sorted((CONFIGS / "method").glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path))
        node.pop("defaults", None)
        cls = method_class(OmegaConf.create({"method": node}))
        default = {f.name: f.default_factory() if f.default is MISSING_FIELD else f.default for f in fields(cls.config_class)}
        default = {k: asdict(v) if is_dataclass(v) else v for k, v in default.items()}  # nested knobs (method.gan.*)
        differ = {k: v for k, v in node.items() if k != "_target_" and v != default[k]}
        assert differ == {}, (path.name, differ)
        composed = compose_config(f"method={path.stem}", tiny=False).method  # with its defaults list: every knob
        assert set(composed) - {"_target_"} == {f.name for f in fields(cls.config_class)}, path.name


# ---------------------------------------------------------------------------- layers
def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


METHOD_FILES = {f"model.{p.stem}" for p in (ROOT / "model").glob("*.py") if p.stem not in ("__init__", "schedule", "contract")}


def _violations(folder: str, forbidden) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in _imports(path):
            if forbidden(name):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


def test_import_rules_hold():
    """entry points -> engine -> methods -> pipeline -> backbones; utils/ are leaves."""
    assert "model.base" in METHOD_FILES and "model.dmd" in METHOD_FILES  # the rule below is not vacuous
    top = lambda name, roots: any(name == r or name.startswith(r + ".") for r in roots)  # noqa: E731
    assert _violations("utils", lambda n: top(n, ["engine", "train", "inference", "evaluate", "scripts", *METHOD_FILES])) == []
    assert _violations("pipeline", lambda n: top(n, ["engine", "train", "inference", "evaluate", "scripts", *METHOD_FILES])) == []
    assert _violations("model", lambda n: top(n, ["engine", "train", "inference", "evaluate", "scripts"])) == []
    for backbone in ("model/wan", "model/toy"):
        assert _violations(backbone, lambda n: top(n, [*METHOD_FILES, "pipeline"])) == []
    # train.py composes, validates, builds, runs and reports; the loop lives in engine/trainer.py
    assert len((ROOT / "train.py").read_text().splitlines()) < 100
    assert not any(name.startswith("model.") for name in _imports(ROOT / "train.py"))


# ---------------------------------------------------------------------------- torchrun without a run directory
def _rundir_worker(rank, world, port, root):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import hydra.core.utils

    class Clock(datetime.datetime):  # rank 1's clock is an hour and a second ahead of rank 0's
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2026, 1, 1, 12 + rank, 0, rank)

    hydra.core.utils.datetime = Clock
    from tests.train_setup import TINY

    sys.argv = ["train.py", *TINY, "max_steps=1", "checkpoint.every=0", "data.metrics=null",
                f"hydra.run.dir={root}/" + "${now:%H-%M-%S}"]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")  # as `torchrun train.py ...` runs it
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_ranks_with_different_clocks_share_rank_zeros_run_directory(tmp_path):
    spawn_ranks(_rundir_worker, 2, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["12-00-00"]  # rank 1's 13-00-01 was removed
    step = tmp_path / "12-00-00" / "checkpoints" / "step_000001"
    assert json.loads((step / "meta.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in step.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
