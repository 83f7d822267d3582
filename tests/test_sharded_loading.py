"""Sharded loading (model.sharded_loading, engine/build.py): networks built on the meta device, sharded by
FSDP2, then filled shard by shard from the weight files, equal bit for bit to the old path (every rank
loads whole networks, then shards them) on 2 gloo ranks: the teacher, a generator read from an
original-Wan-named file, a LoRA critic copied from the teacher (base and adapters), the UMT5 text
encoder (in from_pretrained's dtypes, its tied embedding kept), and an int8 teacher and text encoder (not
sharded: the same int8 data and scales).
Each rank holds only its rows, and the forwards agree."""

import os

import pytest
import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from engine.build import build_method
from model.wan.weights import diffusers_to_wan, load_backbone
from tests.dist_setup import spawn_ranks
from tests.test_wan_training import wan_config
from tests.wan_folder import tiny_wan_folder  # noqa: F401  (session fixture)
from utils import distributed as D
from utils.fsdp import build_mesh
from utils.rng import seed_everything

WORLD = 2
NETWORKS = ("teacher", "generator", "critic", "text_encoder")
MODES = {"eager": ("model.sharded_loading=false",), "sharded": ("model.sharded_loading=true",)}


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every state tensor in full; a torchao tensor as its int8 data and scales."""
    out = {}
    for name, t in module.state_dict().items():
        if hasattr(t, "qdata"):
            out[name + ".qdata"], out[name + ".scale"] = t.qdata.clone(), t.scale.clone()
        else:
            out[name] = full(t)
    return out


def local_fraction(module: torch.nn.Module) -> float:
    """Elements this rank holds / elements of the network."""
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in module.parameters())
    return local / sum(p.numel() for p in module.parameters())


def worker(rank, world, port, folder, generator_init, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = D.init_distributed("cpu")
    mesh = build_mesh(wan_config(folder).fsdp, dist)
    results = {}
    x = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([[700.0, 300.0]])
    for precision in ("null", "int8"):
        for mode, overrides in MODES.items():
            cfg = wan_config(folder, "model.dtype=bfloat16", f"model.generator_init={generator_init}",
                             "model.lora.critic.rank=4", f"model.precision.teacher={precision}",
                             f"model.precision.text_encoder={precision}", *overrides)
            seed_everything(0, 0)  # as the trainer does before building
            method = build_method(cfg, torch.device("cpu"), mesh)
            nets = {"teacher": method.real_score, "generator": method.generator, "critic": method.fake_score,
                    "text_encoder": method.text_encoder}
            with torch.no_grad():
                context = method.encode(["a red circle moving left"])
                forward = method.real_score(x, t, context)
            results[precision, mode] = {
                "weights": {n: snapshot(m) for n, m in nets.items()},  # full_tensor is a collective: every rank
                "dtypes": {n: {k: v.dtype for k, v in m.state_dict().items()} for n, m in nets.items()},
                "fraction": {n: local_fraction(m) for n, m in nets.items()},
                "forward": forward, "context": context,
            }
    torch.save(results, out / f"rank{rank}.pt")
    D.destroy()


@pytest.fixture(scope="module")
def ranks(tiny_wan_folder, tmp_path_factory):  # noqa: F811
    """Both ranks' results; the generator init is the folder's transformer under original-Wan names, with
    every tensor changed, so it cannot pass for the teacher."""
    out = tmp_path_factory.mktemp("sharded")
    state = {k: v + 0.01 for k, v in load_backbone(tiny_wan_folder).state_dict().items()}
    save_file(diffusers_to_wan(state), str(out / "generator_wan_names.safetensors"))
    spawn_ranks(worker, WORLD, tiny_wan_folder, out / "generator_wan_names.safetensors", out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("precision", ["null", "int8"])
def test_sharded_load_equals_eager_load(ranks, precision):
    eager, sharded = ranks[0][precision, "eager"], ranks[0][precision, "sharded"]
    for net in NETWORKS:
        a, b = eager["weights"][net], sharded["weights"][net]
        assert a.keys() == b.keys(), net
        different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
        assert not different, (net, different[:5])
        assert eager["dtypes"][net] == sharded["dtypes"][net], net
    # the generator is the file's (every tensor moved by 0.01), not the teacher; the LoRA critic's adapters
    # start as initial_adapters draws them (lora_B zero, lora_A nonzero)
    w = sharded["weights"]
    assert (w["generator"]["patch_embedding.weight"] - w["teacher"]["patch_embedding.weight"].float()).abs().min() > 0.005
    adapters = {k: v for k, v in w["critic"].items() if ".lora_" in k}
    assert len(adapters) == 2 * 2 * 2 * 4  # A, B x 2 attentions x 2 blocks x q k v o
    assert all(v.abs().max() == 0 for k, v in adapters.items() if ".lora_B." in k)
    assert all(v.abs().max() > 0 for k, v in adapters.items() if ".lora_A." in k)
    # the text encoder in bf16 throughout, as transformers' from_pretrained gives it (T5's `wo` stays float32 for fp16 only),
    # its embedding tied to `shared` (int8: quantised layer by layer as they load, which must keep the tie)
    assert set(sharded["dtypes"]["text_encoder"].values()) == {torch.bfloat16}
    te = sharded["weights"]["text_encoder"]
    assert torch.equal(te["model.shared.weight"], te["model.encoder.embed_tokens.weight"])


@pytest.mark.parametrize("precision", ["null", "int8"])
def test_each_rank_holds_only_its_shards_and_forwards_agree(ranks, precision):
    for rank in ranks:
        eager, sharded = rank[precision, "eager"], rank[precision, "sharded"]
        assert torch.equal(eager["forward"], sharded["forward"]) and torch.equal(eager["context"], sharded["context"])
        quantised = ("teacher", "text_encoder") if precision == "int8" else ()
        for net in NETWORKS:
            if net in quantised:  # torchao's tensors cannot be sharded: each rank holds the whole int8 network
                assert sharded["fraction"][net] == 1.0, net
            else:
                assert 0.45 < sharded["fraction"][net] < 0.6, (net, sharded["fraction"][net])  # about half, with padding
    assert torch.equal(ranks[0][precision, "sharded"]["forward"], ranks[1][precision, "sharded"]["forward"])
