"""CUDA graphs for the chunked generator: one captured graph per chunk position, replayed at every step.

A chunk call of the 1.3B DiT launches about two thousand kernels; in eager mode the host spends
tens of milliseconds issuing them, which is as long as the GPU takes to run the small first chunks.
Every call of a rollout at one chunk position has the same shapes, reads and writes the same KV-cache
slots (the cache is static and its plan is host-side ints) and reads the same cross-attention K/V,
so the call can be captured once and replayed: the timestep and the noisy chunk are copied into the
graph's input tensors, and the flow prediction is copied out. The denoising steps and the context
pass of a chunk share one graph (the timestep is an input).

The cross-attention cache fill (the text K/V of every block, once per prompt batch, before the first
chunk) is one more graph from the second prompt batch on, which writes into the cache's own tensors.

Graphs are keyed by the chunk position, the shapes and the addresses of the caches, so they are
reused across videos as long as the same `KVCache` and `CrossAttnCache` objects are reset and passed
again (`CrossAttnCache` copies a new prompt batch into its old memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.wan.kv_cache import ChunkPlan, CrossAttnCache, KVCache


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor  # the graph's inputs, written before each replay
    timestep: torch.Tensor
    out: torch.Tensor  # the graph's output, overwritten by each replay
    plan: ChunkPlan  # the cache plan the graph was captured with


class ChunkGraphs:
    """Callable like the generator in chunk mode (kv_cache, frame_offset, crossattn_cache), replaying graphs."""

    def __init__(self, generator: torch.nn.Module):
        self.generator = generator
        self.graphs: dict[tuple, _Captured] = {}
        self.fill: tuple | None = None  # (key, graph, static text input): the cross-attention cache fill
        self.pool = None  # one memory pool for all graphs: they never run at the same time

    @property
    def config(self):
        return self.generator.config

    def clear(self) -> None:
        """Drop every graph (and, once unreferenced, its memory)."""
        self.graphs.clear()
        self.fill = None
        self.pool = None

    def forget(self, kv_cache: KVCache) -> None:
        """Drop the graphs captured against `kv_cache` (a stream that ends while others go on)."""
        self.graphs = {key: g for key, g in self.graphs.items() if key[4] != id(kv_cache)}

    @torch.no_grad()
    def __call__(self, x, timestep, context, *, kv_cache: KVCache | None = None, frame_offset: int = 0,
                 crossattn_cache: CrossAttnCache | None = None) -> torch.Tensor:
        if not x.is_cuda:
            raise ValueError(f"CUDA graphs need the generator on a CUDA device, got x on {x.device}; set speed.cuda_graphs=false")
        if kv_cache is None or crossattn_cache is None:
            raise ValueError("CUDA graphs replay chunk calls: pass the kv_cache and crossattn_cache the rollout keeps")
        if not crossattn_cache.filled:  # the text K/V once per prompt batch, so that every call is a "reuse" call
            self.fill_crossattn_cache(context, crossattn_cache)
        key = (frame_offset, tuple(x.shape), x.dtype, tuple(timestep.shape), id(kv_cache), kv_cache.k.data_ptr(),
               id(crossattn_cache), crossattn_cache.context.data_ptr(), crossattn_cache.kv[0][0].data_ptr(),
               None if crossattn_cache.text_bias is None else crossattn_cache.text_bias.data_ptr())
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self._capture(x, timestep, context, kv_cache, frame_offset, crossattn_cache)
        else:
            plan = kv_cache.plan(frame_offset, x.shape[1], x.shape[0], kv_cache.tokens_per_frame)  # checks + bookkeeping
            if plan != captured.plan:
                raise RuntimeError(f"the cache plan of chunk {frame_offset} changed since its graph was captured")
            captured.x.copy_(x)
            captured.timestep.copy_(timestep)
        captured.graph.replay()
        return captured.out.clone()

    def fill_crossattn_cache(self, context: torch.Tensor, cache: CrossAttnCache) -> None:
        """Fill the cross-attention cache: eagerly while its buffers do not exist yet (the first prompt
        batch allocates them), then through a graph that writes into them: its few hundred small kernels,
        launched one by one, would hold the host back before the first chunk can start."""
        context = self.generator.prepare_text(context, cache)  # eager: compacting reads the prompts' lengths
        if cache.context is None or cache.context.shape[0] != context.shape[0] or cache.kv[0] is None:
            self.generator.store_text_kv(context, cache)
            return
        key = (tuple(context.shape), context.dtype, id(cache), cache.context.data_ptr(), cache.kv[0][0].data_ptr())
        if self.fill is None or self.fill[0] != key:
            static = context.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up, as capture requires
                self.generator.store_text_kv(static, cache)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                self.generator.store_text_kv(static, cache)  # copies into the cache's own tensors
            if (cache.context.data_ptr(), cache.kv[0][0].data_ptr()) != key[3:]:
                raise RuntimeError("the cross-attention cache moved while its fill was captured")
            self.fill = (key, graph, static)
        _, graph, static = self.fill
        static.copy_(context)
        graph.replay()
        cache.filled = True

    def _capture(self, x, timestep, context, kv_cache, frame_offset, crossattn_cache) -> _Captured:
        static_x, static_t = x.clone(), timestep.clone()
        # A "reuse" call reads only the shape of the text (its K/V come from the cache): a tiny
        # placeholder keeps the graph from holding on to the caller's tensor.
        text = torch.zeros(context.shape[0], 1, context.shape[2], device=x.device, dtype=context.dtype)

        def call():
            return self.generator(static_x, static_t, text, kv_cache=kv_cache, frame_offset=frame_offset,
                                  crossattn_cache=crossattn_cache)

        # Warm up on a side stream (compilation, kernel autotuning, library handles), as capture requires.
        # It writes this chunk's K/V into its slots; the replay below writes them again.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            out = call()
        plan = kv_cache.plan(frame_offset, x.shape[1], x.shape[0], kv_cache.tokens_per_frame)  # what capture planned
        return _Captured(graph, static_x, static_t, out, plan)
