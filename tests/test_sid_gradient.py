"""SiD differentiates through the scores with respect to their input: the exact teacher's input
gradient must be the true one, on the CPU (its per-prompt loop) and on CUDA (its gathered path)."""

import pytest
import torch

from scripts.probe_sid_device import teacher_fd_error
from tests.train_setup import compose_config
from engine.build import build_method

# Central differences in float64 at eps 1e-6 are exact to about eps^2 x third derivative plus
# 1e-16 / eps of rounding: ~1e-10 relative here; a wrong or missing gradient path errs by O(1).
FD_RTOL = 1e-7


def _method(device: str):
    cfg = compose_config("method=sid", "method.guidance_scale=2.0")  # CFG: conditional and "" rows both
    return build_method(cfg, torch.device(device))


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_teacher_gradient_matches_finite_differences_on_cpu(seed):
    method = _method("cpu")
    prompts = ["a red circle moving left", "a blue square moving up", ""]
    assert teacher_fd_error(method, prompts, seed) <= FD_RTOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_exact_teacher_gradient_matches_finite_differences_on_cuda():
    method = _method("cuda")
    prompts = ["a red circle moving left", "a blue square moving up", ""]
    error = teacher_fd_error(method, prompts, 0)
    print(f"exact teacher input gradient vs central difference on CUDA: rel err {error:.2e}")
    assert error <= FD_RTOL
