"""Frozen networks in lower precision (model.precision.<network>, engine/quantize.py): an int8 teacher's real
score against bf16 on fixed inputs, an int8 UMT5 text encoder, the toy world's int8 exact teacher, and the
one-line errors for int8 on a trained network, fp8 on a CPU, int8 on a network without linear layers."""

import pytest
import torch

from engine.build import build_method
from engine.config import validate
from engine.quantize import round_trip, weight_bytes
from tests.test_wan_training import wan_config
from tests.train_setup import compose_config
from tests.wan_folder import tiny_wan_folder  # noqa: F401  (session fixture)

CPU = torch.device("cpu")
PROMPTS = ["a red circle moving left", "the blue car moving right"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def scores(tiny_wan_folder):  # noqa: F811
    """The real score (flow) and its CFG-3 x0, as DMD uses it, of the tiny Wan teacher stored in fp32, bf16
    and int8 (bf16 activations), on one fixed batch; and the methods, for their weights."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 4, 4, 4, generator=g)  # [B, F, C, H, W]
    t = torch.tensor([[900.0, 900.0], [300.0, 300.0]])
    context = torch.randn(2, 7, 16, generator=g)
    out = {}
    for name, overrides in {"fp32": ["model.dtype=float32"], "bf16": ["model.precision.teacher=bf16"],
                            "int8": ["model.precision.teacher=int8", "model.precision.text_encoder=int8"]}.items():
        method = build_method(wan_config(tiny_wan_folder, "model.dtype=bfloat16", "method.negative_prompt=the dog",
                                         *overrides), CPU)
        with torch.no_grad():
            flow = method.real_score(x, t, context)
            x0 = method.guided_x0(method.real_score, x, t, method.encode(PROMPTS), 3.0)
            embeds = method.text_encoder(PROMPTS)["prompt_embeds"]
        out[name] = dict(method=method, flow=flow, x0=x0, embeds=embeds)
    return out


def test_int8_teacher_is_within_tolerance_of_bf16(scores):
    int8, bf16, fp32 = scores["int8"], scores["bf16"], scores["fp32"]
    teacher = int8["method"].real_score
    linears = [m for m in teacher.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m.weight).__name__ == "Int8Tensor" for m in linears)
    assert teacher.patch_embedding.weight.dtype == torch.bfloat16  # the rest keeps the teacher's dtype
    flow, x0 = rel(int8["flow"], bf16["flow"]), rel(int8["x0"], bf16["x0"])
    print(f"int8 vs bf16: flow {flow:.4f}, CFG-3 x0 {x0:.4f}; bf16 vs fp32: flow {rel(bf16['flow'], fp32['flow']):.4f}, "
          f"x0 {rel(bf16['x0'], fp32['x0']):.4f}")
    # measured on the tiny random teacher: 0.0106 and 0.0172 (bf16 itself is 0.0065 / 0.0124 from fp32)
    assert 1e-4 < flow < 0.02 and 1e-4 < x0 < 0.03
    assert flow < 2 * rel(bf16["flow"], fp32["flow"])  # int8 costs about what bf16 does over fp32, not more


def test_int8_halves_the_linear_weights_and_quantises_the_text_encoder(scores):
    def linear_bytes(module):
        return sum(weight_bytes(m) - (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)
                   for m in module.modules() if isinstance(m, torch.nn.Linear))

    bf16, int8 = scores["bf16"]["method"], scores["int8"]["method"]
    ratio = linear_bytes(int8.real_score) / linear_bytes(bf16.real_score)
    # each row of n int8 values carries an fp32 scale and an int8 zero point: (n + 5) bytes against 2n in bf16;
    # the tiny teacher's rows are 16 to 32 wide (about 0.64), Wan-1.3B's 1536 to 8960 (0.50)
    shapes = [m.weight.shape for m in bf16.real_score.modules() if isinstance(m, torch.nn.Linear)]
    expected = sum(out * (n + 5) for out, n in shapes) / sum(2 * out * n for out, n in shapes)
    assert abs(ratio - expected) < 1e-12 and ratio < 0.66, (ratio, expected)
    encoder = int8.text_encoder.model
    assert all(type(m.weight).__name__ == "Int8Tensor" for m in encoder.modules() if isinstance(m, torch.nn.Linear))
    assert rel(scores["int8"]["embeds"], scores["bf16"]["embeds"]) < 0.02


def test_the_toy_teachers_int8_templates_are_rounded_per_row():
    method = build_method(compose_config("model.precision.teacher=int8"), CPU)
    exact = build_method(compose_config(), CPU)
    q, ref = method.real_score.templates(6, CPU), exact.real_score.templates(6, CPU)
    rows, ref_rows = q.flatten(0, 1), ref.flatten(0, 1)
    step = ref_rows.abs().amax(dim=1, keepdim=True) / 127  # symmetric int8 per (template, frame) row
    error = (rows - ref_rows).abs()
    assert error.max() > 0 and bool((error <= step / 2 + 1e-6).all())
    x = ref[:2].view(2, 6, *method.latent_shape).float() + 0.1 * torch.randn(2, 6, *method.latent_shape)
    context = method.encode(method.real_score.world.prompts[:2])
    t = torch.full((2,), 300.0)
    assert rel(method.real_score.x0(x, t, context), exact.real_score.x0(x, t, context)) < 0.01
    assert torch.equal(round_trip("bf16")(torch.tensor([[1.0 + 2**-10]])), torch.tensor([[1.0]]))


def test_bad_precisions_are_one_line_errors_naming_the_key(tiny_wan_folder):  # noqa: F811
    def one_line(error, start):
        assert str(error.value).startswith(start) and "\n" not in str(error.value), str(error.value)

    with pytest.raises(ValueError) as error:  # a trained network: named at validation, before any build
        validate(compose_config("model.precision.generator=int8"))
    one_line(error, "model.precision.generator=int8: the generator trains")
    assert "model.lora.generator.rank" in str(error.value)
    with pytest.raises(ValueError) as error:  # and by build_method for callers that skip validate
        build_method(compose_config("model.precision.critic=bf16"), CPU)
    one_line(error, "model.precision.critic=bf16: the critic trains")
    with pytest.raises(ValueError) as error:
        build_method(wan_config(tiny_wan_folder, "model.precision.teacher=fp8"), CPU)
    one_line(error, "model.precision.teacher=fp8 needs a GPU with fp8 arithmetic")
    assert "this run is on cpu" in str(error.value)
    with pytest.raises(ValueError) as error:
        build_method(compose_config("model.precision.text_encoder=int8"), CPU)
    one_line(error, "model.precision.text_encoder=int8: the text_encoder (ToyTextEncoder) has no linear layers")
    with pytest.raises(ValueError) as error:
        validate(compose_config("method=ode_regression", "model.precision.critic=int8"))
    one_line(error, "model.precision.critic=int8: ODERegression declares no network 'critic'")
