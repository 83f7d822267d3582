"""train.py and inference.py as a user runs them: from any working directory, expected errors in one
line without a traceback, no empty run directory left by a failed start, bad values named at
validation, keys the schema does not know refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import validate
from tests.train_setup import TINY, compose_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
ENV.pop("HYDRA_FULL_ERROR", None)


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("override, named", [
    ("max_steps=-1", "max_steps must be >= 0, got -1"),
    ("batch_size=0", "batch_size must be >= 1, got 0"),
    ("optim.generator.lr=-1e-4", "optim.generator.lr must be >= 0"),
    ("optim.critic.betas=[0.9]", "optim.critic.betas must be two numbers in [0, 1)"),
    ("ema_weight=1.5", "ema_weight must be in [0, 1)"),
    ("ema_weight=-0.1", "ema_weight must be in [0, 1)"),
    ("method.num_training_frames=5", "method.num_training_frames=5: a block-causal clip of 5 latent frames does not split"),
    ("eval.num_frames=3", "eval.num_frames=3: a block-causal clip"),
    ("logger.every=0", "logger.every must be >= 1"),
    ("threads=0", "threads must be >= 1 or null"),
    ("+foo=1", "unknown key foo: not in the training schema"),
    ("+model.dtypee=float32", "unknown key model.dtypee (did you mean model.dtype?)"),
    ("+fsdp.cpu_offload.head=true", "unknown key fsdp.cpu_offload.head"),
])
def test_bad_values_and_unknown_keys_are_named_at_validation(override, named):
    with pytest.raises(ValueError) as error:
        validate(compose_config(override))
    assert named in str(error.value)
    assert "\n" not in str(error.value)  # one line


def test_an_expected_error_is_one_line_and_leaves_no_run_directory(tmp_path):
    out = run_script("train.py", "max_steps=-1", "hydra.run.dir=runs/bad", cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [f"error: max_steps must be >= 0, got -1 (nothing was written: the run directory "
                     f"{tmp_path / 'runs' / 'bad'} was removed)"]
    assert not (tmp_path / "runs" / "bad").exists()
    out = run_script("train.py", "max_steps=-1", "debug=true", "hydra.run.dir=runs/bad", cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" in out.stderr and "max_steps must be >= 0" in out.stderr


def test_train_and_inference_run_from_another_working_directory(tmp_path):
    """The toy model's shipped initialisation (${project:assets/...}) is found wherever the user stands."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run_script("train.py", *TINY, "max_steps=1", "model.generator_init=${project:assets/toy/ode_init.safetensors}",
                     "model.backbone.num_layers=4", "model.backbone.num_attention_heads=4",
                     "model.backbone.attention_head_dim=16", "model.backbone.ffn_dim=256", "model.backbone.freq_dim=64",
                     "hydra.run.dir=run", cwd=elsewhere)
    assert out.returncode == 0, out.stderr[-2000:]
    export = elsewhere / "run" / "checkpoints" / "step_000001" / "export"
    assert (export / "model.safetensors").is_file()
    config = json.loads((export / "config.json").read_text())
    assert config["model"]["generator_init"] == "${project:assets/toy/ode_init.safetensors}"  # portable, not a path
    out = run_script("inference.py", "checkpoint=run", "device=cpu", "seed=0", "num_frames=4", "output_dir=videos",
                     cwd=elsewhere)
    assert out.returncode == 0, out.stderr[-2000:]
    index = json.loads((elsewhere / "videos" / "index.json").read_text())
    assert index["items"] and all((elsewhere / "videos" / item["file"]).is_file() for item in index["items"])
