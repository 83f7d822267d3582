"""The method contract: what a method declares so that one engine can train it.

A method class (model/dmd.py, model/sid.py, ...) states as class attributes which networks it has
(`networks`) and how it updates them (`phases`). The engine (engine/) builds, shards, checkpoints,
averages (EMA) and steps exactly what is declared, so a method with a third trained network (a
discriminator head) or with only a generator needs no engine change:

    class MyMethod(SelfForcingModel):
        networks = {**SelfForcingModel.networks,
                    "head": Network("head", build=make_head, trained=True)}
        phases = (Phase("generator", "generator_loss", ("generator",), every="dfake_gen_update_ratio"),
                  Phase("critic", "critic_loss", ("critic", "head")))

Names are the config and checkpoint names: network `critic` has the optimizer `optim.critic`,
the checkpoint entries `critic` / `critic_optim` / `critic_sched`, and the keys
`fsdp.reshard_after_forward.critic` and `model.checkpoint_policy.critic` where those exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

# The engine's builders (engine/build.py), named by a Network's `build`: each reads its model.* keys.
BUILDERS = ("generator", "critic", "teacher", "text_encoder", "vae")


@dataclass(frozen=True)
class Network:
    """One network of a method; its name is its key in the method's `networks`."""

    attr: str  # the method's attribute that holds it (generator, real_score, fake_score, ...)
    build: Union[str, Callable]  # one of BUILDERS, or fn(cfg, built: dict[name, module]) -> nn.Module
    trained: bool = False  # trained: its own AdamW (optim.<name>), fp32 master weights, gradients
    ema: bool = False  # keep an exponential moving average (the generator's is what inference uses)
    shard: bool = True  # FSDP2: fully_shard each block and the root (networks without parameters stay as they are)
    blocks: tuple[str, ...] = ()  # class names of its FSDP units; empty: those its `_no_split_modules` name
    state: bool = False  # not trained, but its buffers are run state the method updates (running statistics):
    #                      checkpointed and restored with the trained networks, kept identical on every rank


@dataclass(frozen=True)
class Phase:
    """One update of a training step: a loss, the trained networks it steps, when, and on what data."""

    name: str  # the noise key and the log prefix (`<name>_loss` must be in the loss's logs)
    loss: str  # the method's function: loss(batch) -> (loss tensor, logs dict)
    updates: tuple[str, ...]  # trained networks whose optimizers step after its backward
    every: Union[int, str] = 1  # runs on steps where step % every == 0; a str names a top-level config key
    data: tuple[str, ...] = ("prompts",)  # data sources (keys of the data config); "a|b": the first one that is set
    # A statistic of the whole global batch the loss needs before any backward (f-distill's mean weight):
    # the method's function prepass(batch) -> {name: tensor}, run without gradients on every micro-batch
    # (same draws as the loss) when the phase accumulates; the engine adds the results over micro-batches
    # and ranks and hands the totals to each loss call as batch["totals"]. With one micro-batch the loss
    # gets no totals and all-reduces its own.
    prepass: str | None = None
    # A phase that runs only at some steps (DCM's detail stage, after its semantic stage): the method's function
    # when(step) -> bool; the phase runs at steps where step % every == 0 and when(step). None: wherever every says.
    when: str | None = None

    def period(self, cfg) -> int:
        every = cfg[self.every] if isinstance(self.every, str) else self.every
        if int(every) < 1:
            key = self.every if isinstance(self.every, str) else f"the {self.name} phase's every"
            raise ValueError(f"{key} must be >= 1, got {every}")
        return int(every)

    def runs_at(self, method, step: int, period: int) -> bool:
        """Whether the phase runs at `step`: `period` (its every) divides the step and its `when`, if any, allows it."""
        return step % period == 0 and (self.when is None or bool(getattr(method, self.when)(step)))


def check_contract(cls) -> None:
    """Refuse an inconsistent declaration with a message naming the method and the field."""
    nets, phases = getattr(cls, "networks", None), getattr(cls, "phases", None)
    name = cls.__name__
    if not isinstance(nets, dict) or not nets or not all(isinstance(n, Network) for n in nets.values()):
        raise TypeError(f"{name}.networks must be a dict of model.contract.Network, got {nets!r}")
    if "generator" not in nets or not nets["generator"].trained:
        raise ValueError(f"{name}.networks must declare a trained 'generator' (what inference runs)")
    if not phases or not all(isinstance(p, Phase) for p in phases):
        raise TypeError(f"{name}.phases must be a non-empty tuple of model.contract.Phase")
    for n, net in nets.items():
        if isinstance(net.build, str) and net.build not in BUILDERS:
            raise ValueError(f"{name}.networks[{n!r}].build={net.build!r}: expected one of {BUILDERS} or a callable")
    seen: set[str] = set()
    for p in phases:
        if p.name in seen:
            raise ValueError(f"{name}: two phases are named {p.name!r}")
        seen.add(p.name)
        for fn in (p.loss, p.prepass, p.when):
            if fn is not None and not callable(getattr(cls, fn, None)):
                raise ValueError(f"{name}: phase {p.name!r} calls {fn!r}, which {name} does not define")
        bad = [u for u in p.updates if u not in nets or not nets[u].trained]
        if not p.updates or bad:
            raise ValueError(f"{name}: phase {p.name!r} updates {list(p.updates)}; each must be a trained network "
                             f"of {name}.networks ({[n for n, v in nets.items() if v.trained]})")
    idle = [n for n, v in nets.items() if v.trained and not any(n in p.updates for p in phases)]
    if idle:
        raise ValueError(f"{name}: trained networks {idle} are updated by no phase")
