"""The Slurm sweep launcher config composes with the submitit plugin's schema, and a Slurm task
becomes a torchrun-style rank."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.train_setup import CONFIGS


def test_slurm_launcher_config_composes(monkeypatch):
    monkeypatch.setenv("SLURM_PARTITION", "gpu")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "experiment=self_forcing_dmd"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert launcher.partition == "gpu" and launcher.account is None
    assert launcher.submitit_folder.startswith("multirun/") and launcher.submitit_folder.endswith("/.submitit/%j")
    # the plugin builds its launcher from this node (sbatch parameters are checked at submission)
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    params = OmegaConf.to_container(launcher, resolve=False)
    params.pop("_target_")
    params["submitit_folder"] = "/tmp/submitit"
    params["name"] = "train"
    assert isinstance(SlurmLauncher(**params), SlurmLauncher)


def test_slurm_task_becomes_a_rank(monkeypatch):
    import os

    from utils import distributed as D

    exported = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
    for key in exported:
        monkeypatch.delenv(key, raising=False)
    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "42", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
           "SLURM_LOCALID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "node[3-4]"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        D._export_submitit_env()
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("9", "16", "1")
        assert os.environ["MASTER_ADDR"] == "node3" and 20000 <= int(os.environ["MASTER_PORT"]) <= 60000
    finally:  # monkeypatch does not undo variables that were absent before: later tests would join "node3"
        for key in exported:
            os.environ.pop(key, None)
