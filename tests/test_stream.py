"""Streams (engine/stream.py) on the tiny random Wan folder and the toy world: a stream gives generate's clip,
its memory does not grow with length, a prompt switch refills the cross-attention cache and re-caches exactly
the window, a continuation writes the given frames as context, and inference.py's timelines and init frames
work end to end or stop with one-line errors."""

import json
from dataclasses import replace
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import engine.inference as inference
import engine.items as items
from engine.inference import Student, generate
from engine.items import Item
from engine.stream import Stream, StreamSchema, context_frames, shift_threshold
from model.wan.attention import CausalPattern
from model.wan.fused import apply_rope
from model.wan.kv_cache import CrossAttnCache, KVCache
from pipeline.rollout import write_context
import tests.test_speed as test_speed  # a module, not its names: pytest would collect its tests here again
from tests.test_inference import compose_inference
from tests.test_inference_safety import export  # noqa: F401  (a fixture: a toy export with random weights)
from tests.wan_folder import TRANSFORMER, tiny_wan_folder  # noqa: F401  (a fixture)
from utils.video import to_uint8

P, Q = "a red car moving left", "the dog in the forest at sunset"
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def student(tiny_wan_folder) -> Student:
    """Blocks of 2 latent frames, trained on 4 (the default window), 2 steps; 64 x 64 pixels, 8 x 8 latents."""
    return variant(test_speed.student(tiny_wan_folder), denoising_step_list=[1000, 500])


def variant(student: Student, **cfg) -> Student:
    return replace(student, cfg=replace(student.cfg, **cfg))


def latents_of(chunks) -> torch.Tensor:
    return torch.cat([c.latents for c in chunks])


def frames_of(chunks) -> torch.Tensor:
    return torch.cat([c.frames for c in chunks])


# ---------------------------------------------------------------------------- the stream is generate's clip
# the training length; twice it, rolling the window (no renumbering yet); a first frame of its own
@pytest.mark.parametrize("num_frames, first_alone", [(4, False), (8, False), (9, True)])
def test_stream_equals_generate_exactly(student, num_frames, first_alone):
    student = variant(student, independent_first_frame=first_alone)
    latents, pixels, _ = generate(student, [Item(0, P, 5, "x")], num_frames)
    chunks = list(Stream(student, P, seed=5, num_frames=num_frames))
    starts = [0, 1, 3, 5, 7] if first_alone else list(range(0, num_frames, 2))
    assert [c.latent_start for c in chunks] == starts and not any(c.context for c in chunks)
    assert torch.equal(latents_of(chunks), latents[0])
    assert torch.equal(frames_of(chunks), torch.from_numpy(to_uint8(pixels[0])))  # the host frames, uint8
    frames = 1 + 4 * (num_frames - 1)
    assert torch.equal(torch.cat([c.timestamps for c in chunks]), torch.arange(frames, dtype=torch.float64) / 16)
    assert [c.first_frame for c in chunks] == [0] + [1 + 4 * (s - 1) for s in starts[1:]]


@pytest.mark.parametrize("sink", [0, 2])
def test_stream_past_the_renumbering_equals_generate_to_rounding(student, sink):
    """Positions drop by a window at sink + 2 windows (KVCache.shift): the same clip up to float rounding, and a
    stream that returns chunks one ahead (lookahead 1) gives the same chunks."""
    student = variant(student, local_attn_size=4, sink_size=sink)  # generate's pattern: the same window and sink
    assert shift_threshold(CausalPattern(2, False, 4, sink)) == 8 + sink
    latents, pixels, _ = generate(student, [Item(0, P, 5, "x")], 20)
    stream = Stream(student, P, seed=5, num_frames=20)
    chunks = list(stream)
    assert stream.offset == 12  # renumbered 3 times by the window of 4 (at frames 8, 12, 16; with the sink 10, 14, 18)
    gap = (latents_of(chunks) - latents[0]).abs().max().item()
    assert 0 < gap < 1e-5 and latents[0].abs().max() > 0.5
    assert (frames_of(chunks).int() - torch.from_numpy(to_uint8(pixels[0])).int()).abs().max() <= 1
    ahead = list(Stream(student, P, seed=5, num_frames=20, settings=StreamSchema(lookahead=1)))
    assert torch.equal(latents_of(ahead), latents_of(chunks)) and torch.equal(frames_of(ahead), frames_of(chunks))


# ---------------------------------------------------------------------------- flat memory
def sizes(stream: Stream) -> dict:
    def shape(x):
        return tuple(x.shape) if isinstance(x, torch.Tensor) else x

    cross = {n: (shape(c.context), [tuple(map(shape, kv)) for kv in c.kv]) for n, c in stream.caches.cross.items()}
    return {"kv": (shape(stream.kv.k), shape(stream.kv.v), stream.kv.k.data_ptr()), "cross": cross,
            "decoder": [shape(x) for x in stream.decoder.feat_cache], "window": [c[1].shape[1] for c in stream._window],
            "queue": len(stream._queue), "sink copy": shape(stream.kv._sink_keys)}


def test_memory_does_not_grow_with_length(student):
    """An endless stream with a sink past rope_max_seq_len (64): every cache keeps its sizes, positions stay below
    sink + 2 windows + a block, and the frames keep coming."""
    stream = Stream(variant(student, local_attn_size=4, sink_size=2), P, seed=1, settings=StreamSchema(lookahead=1))
    positions, snapshot = [], None
    for i, chunk in enumerate(stream):
        positions.append(stream.frame - stream.offset)
        if i == 8:  # past the first renumbering
            snapshot = sizes(stream)
        if i == 40:
            break
    assert stream.frame == 84 > TRANSFORMER["rope_max_seq_len"] and stream.offset == 76  # 19 renumberings
    assert max(positions) == shift_threshold(stream.pattern) == 10  # the end of a chunk started, at most
    assert sizes(stream) == snapshot and snapshot["sink copy"] == (2, 1, 32, 2, 8)  # layers, batch, 2 frames x 16 tokens
    assert sum(snapshot["window"]) == 4 and snapshot["queue"] == 1
    assert chunk.first_frame == 1 + 4 * 79 and chunk.frames.shape == (8, 64, 64, 3) and chunk.frames.float().std() > 1
    stream.stop()
    assert stream.kv is None and stream.caches.kv is None and next(stream, None) is None


# ---------------------------------------------------------------------------- prompt switches
def run_switch(student, recache: bool | None, chunks: int = 3, **settings):
    stream = Stream(student, P, seed=2, settings=StreamSchema(window=6, **settings))
    out = [next(stream) for _ in range(chunks)]
    if recache is not None:
        assert stream.switch(Q, recache=recache) == stream.time_of(2 * chunks)
    out.append(next(stream))
    return stream, out


def test_switch_refills_cross_attention_and_recache_differs_from_a_plain_switch(student):
    kept, none = run_switch(student, None)
    plain, with_plain = run_switch(student, False)
    recached, with_recache = run_switch(student, True)
    for other in (with_plain, with_recache):
        assert torch.equal(latents_of(other[:3]), latents_of(none[:3]))  # nothing changes before the switch
    assert [c.prompt for c in with_recache] == [P, P, P, Q] and recached.switches == [(6, Q, True)]
    assert (with_recache[3].latents - with_plain[3].latents).abs().max() > 1e-2
    assert (with_plain[3].latents - none[3].latents).abs().max() > 1e-2
    fresh = CrossAttnCache(TRANSFORMER["num_layers"])
    student.generator.fill_crossattn_cache(student.encode([Q]), fresh)
    for stream in (plain, recached):
        assert torch.equal(stream._cross.context, fresh.context)
        assert all(torch.equal(a, b) for kv, ref in zip(stream._cross.kv, fresh.kv) for a, b in zip(kv, ref))
    assert not torch.equal(kept._cross.kv[0][0], fresh.kv[0][0])
    # frames 2..5 (slots 2..5 of the ring of 6; the new chunk wrote frames 6, 7 into slots 0, 1): a plain switch
    # leaves their keys as the stream without a switch has them, a re-cache rewrites them
    t = 16
    assert torch.equal(plain.kv.k[:, :, 2 * t : 6 * t], kept.kv.k[:, :, 2 * t : 6 * t])
    assert torch.equal(plain.kv.v[:, :, 2 * t : 6 * t], kept.kv.v[:, :, 2 * t : 6 * t])
    assert (recached.kv.v[:, :, 2 * t : 6 * t] - kept.kv.v[:, :, 2 * t : 6 * t]).abs().max() > 1e-3


def test_a_switch_takes_effect_at_the_first_chunk_not_started(student):
    stream = Stream(student, P, seed=2, settings=StreamSchema(window=6, lookahead=1))
    first = next(stream)  # chunk 0 returned, chunk 1 (frames 2, 3) already started
    assert first.latent_start == 0 and stream.switch(Q) == stream.time_of(4) == 13 / 16
    assert [next(stream).prompt for _ in range(3)] == [P, Q, Q]
    assert stream.switch(P, at=12) == stream.time_of(12) and stream.switch(P, at=10) == stream.time_of(10)
    with pytest.raises(ValueError, match="a switch at latent frame 3: expected a chunk start"):
        stream.switch(P, at=3)
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        stream.switch("  ")


def window_keys(student, latents: torch.Tensor, prompt: str, cache: KVCache, first: int) -> None:
    """Write `latents` chunk by chunk at positions first, first + 2, ... as context passes under `prompt`."""
    text, cross = student.encode([prompt]), CrossAttnCache(TRANSFORMER["num_layers"])
    for j in range(0, latents.shape[0], 2):
        write_context(student.generator, latents[None, j : j + 2], text, first + j, schedule=student.schedule,
                      context_noise=0.0, rng=None, kv_cache=cache, crossattn_cache=cross)


def test_recache_of_a_filling_window_equals_writing_its_latents_under_the_new_prompt(student):
    """A switch at frame 4 with a window of 6: frames 0..3 are recomputed under Q, exactly what a fresh cache holds
    after context passes of the same latents under Q."""
    stream, chunks = run_switch(student, True, chunks=2)
    reference = KVCache.for_model(student.generator, stream.pattern, batch_size=1, latent_hw=(8, 8))
    window_keys(student, latents_of(chunks[:2]), Q, reference, 0)
    t = 16
    assert torch.equal(stream.kv.k[:, :, : 4 * t], reference.k[:, :, : 4 * t])
    assert torch.equal(stream.kv.v[:, :, : 4 * t], reference.v[:, :, : 4 * t])


def test_recache_of_a_rolled_window_attends_to_the_sink_and_the_window_only(student):
    """A switch at frame 10, window 6, sink 2: frames 4..9 are recomputed, each chunk attending to the kept sink
    (its keys untouched) and the window's chunks up to its own. Reference: the sink's keys moved 2 positions down
    (so they sit just before the window) and the window's latents written after them under Q, positions 2..7;
    attention sees only position differences, so its keys rotated back by 2 equal the stream's to rounding."""
    stream = Stream(student, P, seed=4, settings=StreamSchema(window=6, sink=2))
    chunks = [next(stream) for _ in range(5)]
    t, layers = 16, TRANSFORMER["num_layers"]
    sink_k, sink_v = stream.kv.k[:, :, : 2 * t].clone(), stream.kv.v[:, :, : 2 * t].clone()
    stream.switch(Q)
    next(stream)  # the re-cache, then frames 10, 11 into the slots of frames 4, 5
    assert torch.equal(stream.kv.k[:, :, : 2 * t], sink_k) and torch.equal(stream.kv.v[:, :, : 2 * t], sink_v)
    reference = KVCache(CausalPattern(2), num_layers=layers, batch_size=1, tokens_per_frame=t, num_heads=2, head_dim=8,
                        capacity_frames=8)
    down, up = student.generator._rope(-2, 1, 1, 1, CPU), student.generator._rope(2, 1, 1, 1, CPU)
    for layer in range(layers):
        reference.k[layer, :, : 2 * t] = apply_rope(sink_k[layer], *down)
    reference.v[:, :, : 2 * t] = sink_v
    reference.end_frame = 2
    window_keys(student, latents_of(chunks[2:]), Q, reference, 2)
    for frame in range(6, 10):
        slot, ref = 2 + (frame - 2) % 6, 2 + frame - 4
        keys = torch.stack([apply_rope(reference.k[layer, :, ref * t : (ref + 1) * t], *up) for layer in range(layers)])
        assert (stream.kv.k[:, :, slot * t : (slot + 1) * t] - keys).abs().max() < 2e-5
        assert (stream.kv.v[:, :, slot * t : (slot + 1) * t] - reference.v[:, :, ref * t : (ref + 1) * t]).abs().max() < 2e-5
    assert (stream.kv.v[:, :, 4 * t : 8 * t] - reference.v[:, :, 4 * t : 8 * t]).abs().max() > 1e-3  # not trivially equal


# ---------------------------------------------------------------------------- continuation
def test_continuation_from_a_streams_first_chunks_repeats_the_rest(student):
    """Endless streams key each chunk's draws by its start: a stream continued from another's first two chunks
    (written as context, here noised to context_noise=100 as a context pass is) gives its later chunks exactly."""
    student = variant(student, context_noise=100.0)
    stream = Stream(student, P, seed=3)
    whole = [next(stream) for _ in range(5)]
    cont = Stream(student, P, seed=3, init_latents=latents_of(whole[:2]))
    got = [next(cont) for _ in range(4)]
    assert got[0].context and not got[1].context and cont.context_frames == 4
    assert torch.equal(got[0].latents, latents_of(whole[:2])) and torch.equal(got[0].frames, frames_of(whole[:2]))
    for a, b in zip(got[1:], whole[2:]):
        assert (a.latent_start, a.first_frame) == (b.latent_start, b.first_frame)
        assert torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames)
        assert torch.equal(a.timestamps, b.timestamps)
    other = Stream(student, Q, seed=3, init_latents=latents_of(whole[:2]))
    next(other)
    assert (next(other).latents - whole[2].latents).abs().max() > 1e-2  # the prompt matters


def test_init_video_and_image_are_encoded_as_whole_blocks(student):
    gen = torch.Generator().manual_seed(0)
    video = torch.rand(16, 3, 64, 64, generator=gen) * 2 - 1
    assert context_frames(16, CausalPattern(2, False, 4, 0), 4) == 4 and context_frames(8, CausalPattern(2, False, 4, 0), 4) == 2
    stream = Stream(student, P, init_video=video)  # 16 frames: 4 latent frames from the last 13
    first = next(stream)
    assert first.context and torch.equal(first.latents, student.vae.encode(video[None, 3:])[0])
    assert first.frames.shape[0] == 13 and next(stream).latent_start == 4
    image = video[0]
    still = next(Stream(student, P, init_image=image))
    assert torch.equal(still.latents, student.vae.encode(image.expand(5, -1, -1, -1)[None])[0])
    for kwargs, message in [(dict(init_video=video[:, :, :32]), "init_video is 64x32 but this model makes 64x64 videos"),
                            (dict(init_video=video[:4]), "init_video has 4 frames; continuing needs at least 5"),
                            (dict(init_video=video, init_image=image), "give one of init_video, init_image"),
                            (dict(init_latents=torch.zeros(3, 4, 8, 8)), "init_latents: a block-causal clip of 3")]:
        with pytest.raises(ValueError, match=message):
            Stream(student, P, **kwargs)


def test_bad_stream_settings_are_one_line_errors(student):
    for settings, message in [(StreamSchema(window=3), r"stream.window=3 must be a positive multiple of num_frame_per_block=2"),
                              (StreamSchema(sink=-1), "stream.sink=-1 must be"),
                              (StreamSchema(window=40), "past the backbone's rope_max_seq_len=64"),
                              (StreamSchema(lookahead=-1), "stream.lookahead=-1 must be")]:
        with pytest.raises(ValueError, match=message):
            Stream(student, P, settings=settings)
    with pytest.raises(ValueError, match="num_frames=3 after 0 context frames"):
        Stream(student, P, num_frames=3)


# ---------------------------------------------------------------------------- timelines
def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_timeline_files_are_read_and_checked(tmp_path):
    one = write(tmp_path / "one.yaml", "- {start: 0, prompt: a red car}\n- {start: 2.5, prompt: ' a blue car '}\n")
    assert items.read_timelines(one) == [((0.0, "a red car"), (2.5, "a blue car"))]
    two = write(tmp_path / "two.yml", "- [{start: 0, prompt: a}]\n- [{start: 0, prompt: b}, {start: 1, prompt: c}]\n")
    assert items.read_timelines(two) == [((0.0, "a"),), ((0.0, "b"), (1.0, "c"))]
    assert items.is_timeline(one) and items.is_timeline("x.YML") and not items.is_timeline("x.txt")
    cases = [("", "holds no timeline"), ("[]", "holds no timeline"), ("- []\n", "timeline 0 is empty"),
             ("- {start: 0, prompt: a}\n- {start: 2, prompt: b}\n- {start: 1, prompt: c}\n",
              r"entry 2 starts at 1 s, not after entry 1 \(2 s\): starts must increase"),
             ("- {start: 0, prompt: a}\n- {start: 0, prompt: b}\n", "entry 1 starts at 0 s, not after entry 0"),
             ("- {start: 1, prompt: a}\n", "the first entry starts at 1 s; a timeline starts at 0"),
             ("- {start: 0, prompt: '  '}\n", "entry 0 .start 0 s. has an empty prompt"),
             ("- {start: -1, prompt: a}\n", "entry 0 has start -1; expected seconds >= 0"),
             ("- {start: 0, prompt: a, end: 3}\n", "entry 0 is .*; expected {start: <seconds>, prompt: <text>}"),
             ("- {start: 0, prompt: a\n", r"is not valid YAML \(line 2\)")]
    for i, (text, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message) as err:
            items.read_timelines(write(tmp_path / f"bad{i}.yaml", text))
        assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist; expected a YAML timeline"):
        items.read_timelines(str(tmp_path / "missing.yaml"))


def test_timeline_entries_are_placed_at_chunk_starts():
    pattern, place = CausalPattern(3, False, 21, 0), items.place_timeline
    timeline = ((0.0, "a"), (1.0, "b"), (2.2, "c"))  # chunks start at 0, 0.5625, 1.3125, 2.0625, 2.8125 s (16 fps, 4x)
    assert place(timeline, 21, 0, pattern, 4, 16, "t") == [(0, "a"), (6, "b"), (12, "c")]
    for timeline, context, message in [(((0.0, "a"), (5.1, "b")), 0, r"entry 1 starts at 5.1 s, past the end of the 5.0625 s video"),
                                       (((0.0, "a"), (4.9, "b")), 0, r"entry 1 starts at 4.9 s, after the last chunk's start \(4.3125 s\)"),
                                       (((0.0, "a"), (1.0, "b"), (1.2, "c")), 0, "entries 1 and 2 take over at the same chunk"),
                                       (((0.0, "a"), (0.3, "b")), 6, "entry 1 starts at 0.3 s, inside the init frames")]:
        with pytest.raises(ValueError, match=message):
            place(timeline, 21, context, pattern, 4, 16, "t")
    assert place(((0.0, "a"), (0.3, "b")), 21, 3, pattern, 4, 16, "t") == [(0, "a"), (3, "b")]  # the first new chunk
    assert items.frames_for_duration(5.0, 16, pattern, 4) == 21 and items.frames_for_duration(5.1, 16, pattern, 4) == 24


def infer(out: Path, export: Path, *overrides: str) -> tuple[dict, torch.Tensor]:
    index = inference.run(compose_inference(f"checkpoint={export}", "save_latents=true", *overrides), out)
    return index, torch.stack([load_file(str(out / i["latents"]))["latents"] for i in index["items"]])


def video_frames(path: Path) -> np.ndarray:
    return iio.imread(path, index=None, plugin="FFMPEG")


def test_inference_timelines_give_one_video_each(export, tmp_path):
    red, blue = "a red circle moving left", "a blue square moving up"
    plain, plain_latents = infer(tmp_path / "plain", export, f"prompts=[{red}, {red}]", "num_frames=12",
                                 "batch_size=1")  # a stream is a batch of one: the same GEMMs
    path = write(tmp_path / "t.yaml", f"- [{{start: 0, prompt: {red}}}]\n"
                                      f"- [{{start: 0, prompt: {red}}}, {{start: 0.3, prompt: {blue}}}]\n")
    index, latents = infer(tmp_path / "t", export, f"prompts={path}", "num_frames=12", "stream.recache=false")
    assert torch.equal(latents[0], plain_latents[0])  # a one-entry timeline is the prompt's video (item 0's noise)
    assert torch.equal(latents[1, :6], plain_latents[1, :6])  # item 1's: the switch at 0.3 s takes over at frame 6
    assert (latents[1, 6:] - plain_latents[1, 6:]).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    assert index["items"][1]["timeline"][1] == {"start": 0.3, "prompt": blue, "latent_frame": 6, "time": 0.375}
    assert [i["file"] for i in index["items"]] == [f"000{i}_a-red-circle-moving-left_seed0.mp4" for i in (0, 1)]
    assert video_frames(tmp_path / "t" / index["items"][1]["file"]).shape[0] == 12
    long, long_latents = infer(tmp_path / "long", export, f"prompts={path}", "duration=1.5", "seed=[1]")
    assert long["num_frames"] == 24 and long_latents.shape[1] == 24 and long["items"][1]["seed"] == 1


def test_inference_continues_a_video_and_an_image(export, tmp_path):
    gen = torch.Generator().manual_seed(0)
    clip = ((torch.rand(7, 8, 8, 3, generator=gen) * 255).round().to(torch.uint8)).numpy()
    iio.imwrite(tmp_path / "clip.png", clip[0])
    iio.imwrite(tmp_path / "clip.mp4", clip, plugin="FFMPEG", fps=16, codec="libx264", macro_block_size=8)
    given = items.read_frames(str(tmp_path / "clip.mp4"), "init_video")  # H.264 is lossy: what inference reads
    assert given.shape == (7, 3, 8, 8) and given.min() >= -1 and given.max() <= 1
    index, latents = infer(tmp_path / "v", export, "prompts=[a red circle moving left]", "num_frames=4",
                           f"init_video={tmp_path / 'clip.mp4'}")
    assert index["items"][0]["context_latent_frames"] == 6 and latents.shape[1] == 10  # the last 6 frames, 3 blocks
    assert torch.equal(latents[0, :6], given[1:])  # the identity VAE: the context latents are the frames
    assert video_frames(tmp_path / "v" / index["items"][0]["file"]).shape[0] == 10
    image, image_latents = infer(tmp_path / "i", export, "prompts=[a red circle moving left]", "num_frames=4",
                                 f"init_image={tmp_path / 'clip.png'}")
    first = torch.from_numpy(clip[0]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(image_latents[0, :2], first.expand(2, -1, -1, -1)) and image_latents.shape[1] == 6


def test_inference_stream_input_errors_are_one_line_and_write_nothing(export, tmp_path):
    empty = write(tmp_path / "empty.yaml", "[]\n")
    unsorted = write(tmp_path / "unsorted.yaml", "- {start: 0, prompt: a red circle moving left}\n"
                                                 "- {start: 0.5, prompt: a red circle moving up}\n"
                                                 "- {start: 0.2, prompt: a red circle moving down}\n")
    late = write(tmp_path / "late.yaml", "- {start: 0, prompt: a red circle moving left}\n"
                                         "- {start: 9, prompt: a red circle moving up}\n")
    unknown = write(tmp_path / "unknown.yaml", "- {start: 0, prompt: a purple circle moving left}\n")
    iio.imwrite(tmp_path / "big.png", np.zeros((16, 16, 3), dtype=np.uint8))
    iio.imwrite(tmp_path / "small.png", np.zeros((8, 8, 3), dtype=np.uint8))
    cases = [([f"prompts={empty}"], ValueError, "holds no timeline"),
             ([f"prompts={unsorted}"], ValueError, "entry 2 starts at 0.2 s, not after entry 1"),
             ([f"prompts={late}"], ValueError, r"entry 1 starts at 9 s, past the end of the 0.375 s video"),
             ([f"prompts={tmp_path / 'nope.yaml'}"], FileNotFoundError, "nope.yaml does not exist; expected a YAML timeline"),
             ([f"prompts={unknown}"], ValueError, "unknown word 'purple'"),
             ([f"prompts={late}", "noise=x.pt"], ValueError, "noise= is for batch inference"),
             ([f"init_video={tmp_path / 'nope.mp4'}"], FileNotFoundError, "init_video=.*nope.mp4 does not exist"),
             ([f"init_image={tmp_path / 'big.png'}"], ValueError, "init_image is 16x16 but this model makes 8x8 videos"),
             ([f"init_image={tmp_path / 'small.png'}", f"init_video={tmp_path / 'small.png'}"], ValueError,
              "init_video and init_image are both set"),
             (["duration=2", "num_frames=6"], ValueError, "num_frames=6 and duration=2.0 both set the length"),
             ([f"prompts={late}", "stream.window=5"], ValueError, "stream.window=5 must be a positive multiple")]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message) as err:
            inference.run(compose_inference(f"checkpoint={export}", "prompts=[a red circle moving left]", *overrides),
                          tmp_path / "out")
        assert "\n" not in str(err.value) and not (tmp_path / "out").exists(), overrides


def test_bench_stream_cpu_path(tmp_path):
    """scripts/bench_stream.py at tiny size: per-chunk rows, switches with a re-cache, the warm-up mark, json and png."""
    from scripts import bench_stream

    out = tmp_path / "bench"
    result = bench_stream.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--seconds", "4", "--switch-every", "1.5",
                                "--window", "4", "--block", "2", "--out", str(out)])
    assert result["frames"] >= 64 and result["chunks"] == len(result["rows"]) == 9 and result["fps"] > 0
    # chunk k ends at (4 + 8k) / 16 s: switches asked after chunks 3 and 6 (1.75 s, 3.25 s) land on chunks 4 and 7
    assert [s["latent_frame"] for s in result["switches"]] == [8, 14] and result["switches"][0]["recache"]
    assert [i for i, r in enumerate(result["rows"]) if r["switched"]] == [4, 7] and not result["stopped_by_max_wall"]
    assert result["warm_up_chunks"] == 5 and result["fps_after_warm_up"] > 0  # from the first renumbering (frame 8)
    assert json.loads(out.with_suffix(".json").read_text())["chunks"] == 9 and out.with_suffix(".png").stat().st_size > 0


# ---------------------------------------------------------------------------- on the GPU (the device machine)
@pytest.mark.gpu
@torch.no_grad()
def test_stream_on_the_fast_path_gives_generates_clip_in_flat_memory(tiny_wan_folder):
    """Every speed lever on (CUDA graphs, decode stream, compiled element-wise ops, compact text): a stream of known
    length replays generate's clip; an endless one with re-caching switches keeps its memory and its graph count."""
    from pipeline.cuda_graphs import ChunkGraphs
    from tests.test_speed_gpu import NO_FA4, rel_err
    from model.wan.text_encoder import WanTextEncoder
    from model.wan.transformer import WanDiT
    from model.wan.vae import WanVAE
    from model.base import MethodConfig
    from tests.wan_tiny import randomize
    from utils.speed import LEVERS, SpeedSchema, apply_levers, resolve_levers

    device = torch.device("cuda")
    torch.manual_seed(0)
    generator = randomize(WanDiT(**{**TRANSFORMER, "attention_head_dim": 64}), seed=3).to(device, torch.bfloat16)
    generator = generator.eval().requires_grad_(False)
    vae = WanVAE(str(tiny_wan_folder), dtype="bfloat16", device=device)
    text = WanTextEncoder(str(tiny_wan_folder), text_len=8, dtype="bfloat16", device=device).eval()
    speed = SpeedSchema(**dict.fromkeys(LEVERS, True))
    speed.fa4_attention, speed.cudnn_attention = not NO_FA4, bool(NO_FA4)
    runner, decode_stream = apply_levers(generator, vae, resolve_levers(speed, device))
    student = Student(generator, text, vae, MethodConfig(num_frame_per_block=3, num_training_frames=9), (4, 30, 52),
                      runner=runner, decode_stream=decode_stream)
    assert isinstance(student.runner, ChunkGraphs) and student.decode_stream is not None

    latents, pixels, _ = generate(student, [Item(0, P, 5, "x")], 18)  # window 9: renumbered first at frame 18
    chunks = list(Stream(student, P, seed=5, num_frames=18))
    lat_err = rel_err(latents_of(chunks).cpu(), latents[0])
    pix_gap = (frames_of(chunks).int() - torch.from_numpy(to_uint8(pixels[0])).int()).abs().max().item()
    print(f"stream vs generate: latents rel err {lat_err:.2e}, pixels max gap {pix_gap} levels")
    assert lat_err <= 1e-6 and pix_gap <= 1

    stream = Stream(student, P, seed=1)
    allocated, graphs = {}, {}
    for i, chunk in enumerate(stream):
        if i in (10, 25):
            stream.switch(Q if i == 10 else P)  # re-cache on
        if i in (30, 60):
            torch.cuda.synchronize()
            allocated[i], graphs[i] = torch.cuda.memory_allocated(device), len(student.runner.graphs)
        if i == 60:
            break
    growth = (allocated[60] - allocated[30]) / 2**20
    print(f"allocated {allocated[30] / 2**20:.1f} -> {allocated[60] / 2**20:.1f} MiB; graphs {graphs}; offset {stream.offset}")
    assert stream.offset > 0 and chunk.frames.dtype == torch.uint8 and not chunk.frames.is_cuda
    assert graphs[60] == graphs[30] <= 2 * 18 // 3 and abs(growth) < 16
    stream.stop()
