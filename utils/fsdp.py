"""FSDP2 for a distillation run: a device mesh, then `fully_shard` per transformer block and at the root.

Applied to built networks before their optimisers exist (torchtitan's `parallelize` order); the
model files know nothing about it. Every network a method declares sharded (model/contract.py) is
sharded the same way: the generator, the critic (fake score), the frozen teacher (real score), the
text encoder and any network a method adds. Networks without parameters (the toy world's exact
teacher and word-vector text encoder) have nothing to shard and stay as they are.

- Mesh: `fsdp.replicate` x `fsdp.shard` ranks. One dimension (replicate = 1) is plain FSDP; two
  are hybrid sharding (HSDP): each group of `shard` consecutive ranks (the GPUs of a node, as
  torchrun numbers them) holds one sharded copy, and gradients are all-reduced across the copies.
- Precision: trained networks keep fp32 sharded master weights; with model.dtype=bfloat16 each
  block is gathered in bf16 for compute (MixedPrecisionPolicy) and gradients are reduced in fp32.
  Forward inputs are not cast by FSDP: the model casts x and the text itself and keeps timesteps
  and RoPE in fp32 (FSDP's cast would round timestep 937.5 to 936 in bf16).
- `fsdp.reshard_after_forward.<network>`: free the gathered weights after each forward (least
  memory) or keep them until the backward (frozen networks: for good, i.e. a full replica).
- `fsdp.cpu_offload.{teacher,text_encoder}`: their shards live in pinned CPU memory.

A single process is world size 1 of the same code: train.py gives it a one-rank process group.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from utils.distributed import Dist


def mesh_shape(replicate: int, shard: int | None, world_size: int) -> tuple[int, int]:
    """(replicate, shard) for a world size, with errors that name the keys to fix."""
    if replicate < 1 or world_size % replicate:
        raise ValueError(
            f"fsdp.replicate={replicate} must be >= 1 and divide the world size {world_size} "
            "(replicate = number of nodes for hybrid sharding, 1 for plain FSDP)"
        )
    shard = world_size // replicate if shard is None else shard
    if replicate * shard != world_size:
        raise ValueError(
            f"fsdp.replicate x fsdp.shard = {replicate} x {shard} = {replicate * shard}, but the world size is "
            f"{world_size}; set fsdp.shard to the GPUs per node (or null: world size / replicate)"
        )
    return replicate, shard


def build_mesh(fsdp_cfg, dist: Dist) -> DeviceMesh:
    """The 1-D (shard) or 2-D (replicate, shard) mesh of all ranks; needs a process group."""
    replicate, shard = mesh_shape(fsdp_cfg.replicate, fsdp_cfg.shard, dist.world_size)
    if replicate == 1:
        return init_device_mesh(dist.device.type, (shard,), mesh_dim_names=("shard",))
    return init_device_mesh(dist.device.type, (replicate, shard), mesh_dim_names=("replicate", "shard"))


def block_modules(net: nn.Module, names: tuple[str, ...] = ()) -> list[nn.Module]:
    """The network's transformer blocks: modules of the classes `names`, or by default those its
    `_no_split_modules` name (diffusers and transformers declare them: WanTransformerBlock, UMT5Block),
    outermost only."""
    names = set(names)
    if not names:
        for m in net.modules():
            names.update(getattr(m, "_no_split_modules", None) or ())
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for m in net.modules():  # parents come before their children
        if id(m) in inside:
            inside.update(id(c) for c in m.children())
            continue
        if any(c.__name__ in names for c in type(m).__mro__):
            blocks.append(m)
            inside.update(id(c) for c in m.children())
    return blocks


def shard_network(net: nn.Module, mesh: DeviceMesh, *, param_dtype: torch.dtype | None,
                  reshard_after_forward: bool, cpu_offload: bool, blocks: tuple[str, ...] = ()) -> nn.Module:
    """`fully_shard` each block, then the root (which takes the remaining parameters: embeddings, heads)."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    kwargs = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                  offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for block in block_modules(net, blocks):
        fully_shard(block, **kwargs)
    fully_shard(net, **kwargs)
    return net


def shard_networks(networks: list[tuple[str, nn.Module, bool, tuple[str, ...]]], fsdp, compute: torch.dtype,
                   mesh: DeviceMesh) -> None:
    """Shard (name, network, trained, block class names) in place, before their optimisers exist (they
    must hold the shards). `fsdp` is the fsdp config; a network it does not name is resharded after
    each forward and not offloaded."""
    for name, net, trained, blocks in networks:
        offload = bool(fsdp.cpu_offload.get(name, False))
        if not any(True for _ in net.parameters()):
            if offload:
                raise ValueError(
                    f"fsdp.cpu_offload.{name}=true, but the {name} ({type(net).__name__}) has no parameters to "
                    "offload; set it to false"
                )
            continue
        if offload and mesh.device_type != "cuda":
            raise ValueError(f"fsdp.cpu_offload.{name}=true needs CUDA (it moves shards off the GPU); set it to false")
        # trained: fp32 master shards gathered in model.dtype; frozen: already stored in model.dtype
        param_dtype = compute if trained and compute != torch.float32 else None
        shard_network(net, mesh, param_dtype=param_dtype, reshard_after_forward=bool(fsdp.reshard_after_forward.get(name, True)),
                      cpu_offload=offload, blocks=tuple(blocks))
        if trained and hasattr(net, "autocast_dtype"):
            net.autocast_dtype = None  # FSDP gathers bf16 weights: no autocast on top
            net.wrapped_param_dtype = param_dtype


def reshard(module: nn.Module) -> None:
    """Free gathered weights of every FSDP unit, so that the next forward gathers the current shards
    (needed after writing shards outside the optimiser, e.g. swapping in EMA weights)."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


# ---------------------------------------------------------------- sharded loading
# A network built on the meta device and sharded there holds no memory; materialize() allocates each
# rank's shards on its device and fills them from the weight files, each rank reading only the rows of
# its shards (FSDP2 shards dim 0), so N ranks never hold N whole copies, on the GPU or on the host.


def state_names(module: nn.Module) -> list[list[str]]:
    """The names of each parameter and persistent buffer, one list per tensor (tied weights, such as
    UMT5's shared / embed_tokens, are one tensor with several names)."""
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    persistent = set(module.state_dict(keep_vars=True))
    for name, b in module.named_buffers(remove_duplicate=False):
        if name in persistent:
            names.setdefault(id(b), []).append(name)
    return list(names.values())


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """(the tensor this rank writes, the first global row it holds; None: the whole tensor)."""
    if not isinstance(t, DTensor):
        return t, None
    if any(p.is_shard() and p.dim != 0 for p in t.placements):
        raise ValueError(f"sharded loading reads row shards (FSDP2's Shard(0)), got placements {t.placements}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), (offset[0] if t.ndim else None)


class _Loader:
    """Fills a module's tensors, one name group at a time, from `tensors` (state-dict names -> anything
    indexed as `t[...]` (whole) or `t[a:b]` (rows) with a `.shape`: tensors, memory-mapped tensors,
    model.wan.weights.FileTensor); records what is missing or misshapen."""

    def __init__(self, module: nn.Module, tensors):
        self.module, self.tensors = module, tensors
        self.groups = state_names(module)
        self.group_of = {n: i for i, names in enumerate(self.groups) for n in names}
        self.filled: set[int] = set()
        self.missing: list[str] = []
        self.misshapen: list[str] = []

    def _tensor(self, name: str) -> torch.Tensor:
        module, _, leaf = name.rpartition(".")
        owner = self.module.get_submodule(module)
        return owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]

    @torch.no_grad()
    def fill(self, name: str) -> None:
        group = self.group_of.get(name)
        if group is None or group in self.filled:
            return
        self.filled.add(group)
        present = [n for n in self.groups[group] if n in self.tensors]
        if not present:
            self.missing.append(self.groups[group][0])
            return
        target, source = self._tensor(name), self.tensors[present[0]]
        if tuple(source.shape) != tuple(target.shape):
            self.misshapen.append(f"{present[0]}: {tuple(source.shape)} vs model {tuple(target.shape)}")
            return
        local, first = _rows(target)
        if local.numel():
            local.copy_(source[...] if first is None else source[first:first + local.shape[0]])

    def result(self) -> tuple[list, list, list]:
        known = {n for names in self.groups for n in names}
        return self.missing, sorted(set(self.tensors) - known), self.misshapen


def load_tensors(module: nn.Module, tensors, strict: bool = True) -> tuple[list, list, list]:
    """Fill `module`'s parameters and persistent buffers from `tensors` (see _Loader); a sharded
    parameter (DTensor) reads only its rows. Returns (missing, unexpected, misshapen) names;
    strict=False: only the names `tensors` holds are filled, the others are not missing."""
    loader = _Loader(module, tensors)
    for names in loader.groups:
        if strict or any(n in tensors for n in names):
            loader.fill(names[0])
    return loader.result()


def materialize(module: nn.Module, device: torch.device, tensors, after=None) -> tuple[list, list, list]:
    """Allocate a meta-built (possibly sharded) module on `device` and fill it from `tensors`
    (load_tensors); returns (missing, unexpected, misshapen) names. Buffers built outside the meta
    device (RoPE tables) keep their values.

    after(submodule): called on each submodule once its own tensors are filled; the submodules are then
    allocated one by one, so a network that `after` quantises (engine/quantize.py) never holds all of
    its weights at full precision at once. A sharded module without `after` is allocated whole by
    FSDP2's to_empty, which re-registers its shards."""
    real = {name: b for name, b in module.named_buffers() if not b.is_meta}
    loader = _Loader(module, tensors)
    if after is None and isinstance(module, FSDPModule):  # FSDP2 re-registers its shards in its to_empty
        module.to_empty(device=device)
        for names in loader.groups:
            loader.fill(names[0])
    else:
        # one tensor at a time, by identity: Module.to_empty gives each module its own new parameter, which
        # would untie weights shared between modules (UMT5's shared / embed_tokens) and leave one unfilled
        made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(meta tensor) -> (it, its replacement)
        for prefix, sub in module.named_modules():  # a shared submodule once: `after` must not quantise it twice
            for table in (sub._parameters, sub._buffers):
                for leaf, t in list(table.items()):
                    if t is not None and not t.is_meta and table is sub._buffers:
                        table[leaf] = t.to(device)  # a buffer computed at build (RoPE tables): moved as it is
                    if t is None or not t.is_meta:
                        continue
                    if id(t) not in made:
                        empty = torch.empty_like(t, device=device)
                        made[id(t)] = (t, nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty)
                    table[leaf] = made[id(t)][1]
            for leaf, _ in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
                loader.fill(f"{prefix}.{leaf}" if prefix else leaf)
            if after is not None:
                after(sub)
    for name, value in real.items():  # FSDP2's to_empty left them uninitialised
        module.get_buffer(name).copy_(value)
    for names in loader.groups:  # the ties as built: an untied copy would hold uninitialised memory
        if len(names) > 1 and len({id(loader._tensor(n)) for n in names}) != 1:
            raise RuntimeError(f"materialize untied the shared weights {names}")
    return loader.result()
