"""A local viewer: a web page that plays a stream (engine/stream.py) as it is generated, with a text box that
switches the prompt at the next chunk. Starlette + uvicorn, imported only here.

    python scripts/serve.py checkpoint=<run dir>                              # then open http://127.0.0.1:7860
    python scripts/serve.py checkpoint=<run dir> prompts="a red circle moving left" seed=1 stream.recache=false
    python scripts/serve.py checkpoint=self_forcing_dmd.pt model=wan2.1_t2v_1.3b prompts="a red car at night" --port 8000
    python scripts/serve.py checkpoint=<run dir> prompts="the car drives on" init_video=clip.mp4   # continue a video

The key=value arguments are inference.py's (configs/inference.yaml: checkpoint, use_ema, prompts (one prompt:
the first one shown), seed, model.* / speed.* / stream.* keys, fps, device, init_video / init_image); the --flags
are the viewer's. The page connects a websocket to /stream (`?prompt=...&seed=...` start another prompt or seed)
and the server runs one endless Stream per connection, one connection at a time (a stream holds the student's
caches and CUDA graphs; a second viewer is told so and closed).

The protocol, for other clients: the server sends a JSON `start` ({fps, width, height, prompt, seed, codec,
window, sink, recache}), then per chunk a JSON `chunk` header ({first_frame, latent_start, timestamps, prompt,
context, generated_s}) followed by one binary message per frame (codec raw: H*W*3 RGB bytes; jpeg: a JPEG
file). The client sends `{"type": "switch", "prompt": ..., "recache": true|false|null}` (answered by `switched`
with the latent frame and time it takes over at, or by a one-line `error`) and `{"type": "stop"}`.

The server keeps at most --ahead seconds of video generated beyond the time since its first frame was sent, so
a switch shows within about that much on a device faster than real time (0: no pacing, generate as fast as the
client takes frames). Binds 127.0.0.1 by default: for a remote GPU, forward the port (ssh -L 7860:127.0.0.1:7860).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.stream import Stream, StreamSchema, stream_pattern  # noqa: E402

log = logging.getLogger("serve")
CODECS = ("jpeg", "raw")
BUSY_CODE = 1013  # websocket close code "try again later": another viewer holds the stream
BAD_INPUT_CODE = 1008  # "policy violation": the start parameters were refused (the message says why)


def web_libraries():
    """Starlette's pieces, imported lazily: nothing else in the project needs a web library."""
    try:
        from starlette.applications import Starlette
        from starlette.responses import HTMLResponse
        from starlette.routing import Route, WebSocketRoute
        from starlette.websockets import WebSocketDisconnect
    except ImportError as e:
        raise SystemExit(f"scripts/serve.py needs starlette and uvicorn ({e}): pip install -r requirements.txt") from e
    return Starlette, HTMLResponse, Route, WebSocketRoute, WebSocketDisconnect


def encode_frames(frames: torch.Tensor, codec: str, quality: int) -> list[bytes]:
    """[F, H, W, 3] uint8 -> one message per frame: raw RGB bytes, or a JPEG file (Pillow, imageio's dependency)."""
    array = frames.numpy()
    if codec == "raw":
        return [np.ascontiguousarray(f).tobytes() for f in array]
    from PIL import Image

    out = []
    for f in array:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


class Viewer:
    """One student served to one viewer at a time. student: engine.student.Student; prompt, seed: the stream a
    connection starts with unless it names others; settings: stream.*; context: latents to continue
    (inference's init_video / init_image); ahead: seconds of video generated ahead of playback (0: no pacing)."""

    def __init__(self, student, prompt: str, seed: int = 0, *, settings: StreamSchema | None = None, fps: float = 16,
                 context: torch.Tensor | None = None, codec: str = "jpeg", quality: int = 90, ahead: float = 2.0):
        if codec not in CODECS:
            raise ValueError(f"--codec {codec!r}: expected one of {', '.join(CODECS)}")
        if not 1 <= quality <= 100:
            raise ValueError(f"--quality {quality}: expected a JPEG quality in 1..100")
        if ahead < 0:
            raise ValueError(f"--ahead {ahead}: expected seconds >= 0 (0: no pacing)")
        self.student, self.prompt, self.seed, self.fps = student, prompt, seed, fps
        self.settings = settings or StreamSchema()
        self.pattern = stream_pattern(student, self.settings)  # a bad window / sink stops the server at start
        self.context, self.codec, self.quality, self.ahead = context, codec, quality, ahead
        self.stream: Stream | None = None  # the connected viewer's stream (None between viewers)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="stream")  # every model call on one thread

    def size(self) -> tuple[int, int]:
        """(width, height) of the frames."""
        h, w = self.student.latent_shape[-2:]
        s = self.student.vae.spatial_compression
        return w * s, h * s

    async def call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def open(self, prompt: str, seed: int) -> Stream:
        return Stream(self.student, prompt, seed, settings=self.settings, fps=self.fps, init_latents=self.context)

    def next_chunk(self):
        """The next chunk and its encoded frames (None at the end), on the worker thread."""
        start = time.perf_counter()
        chunk = next(self.stream, None)
        if chunk is None:
            return None
        return chunk, encode_frames(chunk.frames, self.codec, self.quality), time.perf_counter() - start


def start_params(query, viewer: Viewer) -> tuple[str, int]:
    prompt = query.get("prompt", viewer.prompt)
    text = query.get("seed", str(viewer.seed))
    try:
        seed = int(text)
    except ValueError:
        raise ValueError(f"seed={text!r}: expected an integer") from None
    return prompt, seed


async def session(ws, viewer: Viewer, disconnect_error) -> None:
    """One viewer: start a stream, send its chunks, apply the switches it sends between chunks."""
    await ws.accept()
    if viewer.stream is not None:
        await ws.send_json({"type": "error", "message": "another viewer is watching this server: one stream at a time"})
        await ws.close(BUSY_CODE)
        return
    try:
        prompt, seed = start_params(ws.query_params, viewer)
        viewer.stream = stream = await viewer.call(viewer.open, prompt, seed)
    except ValueError as e:
        await ws.send_json({"type": "error", "message": str(e)})
        await ws.close(BAD_INPUT_CODE)
        return
    width, height = viewer.size()
    await ws.send_json({"type": "start", "fps": viewer.fps, "width": width, "height": height, "prompt": prompt,
                        "seed": seed, "codec": viewer.codec, "window": stream.pattern.local_attn_size,
                        "sink": stream.pattern.sink_size, "recache": stream.recache})
    inbox: asyncio.Queue = asyncio.Queue()

    async def receive() -> None:
        try:
            while True:
                await inbox.put(await ws.receive_text())
        except (disconnect_error, RuntimeError):  # the viewer left, or the server closed the socket
            await inbox.put(None)

    receiver = asyncio.create_task(receive())
    try:
        first_sent = None
        while True:
            # a switch typed while the next chunk waits (pacing) is applied before it starts
            wait = 0.0
            if first_sent is not None and viewer.ahead > 0:
                wait = stream.time_of(stream.frame) - viewer.ahead - (time.perf_counter() - first_sent)
            if not await handle_messages(ws, viewer, inbox, max(wait, 0.0)):
                return
            result = await viewer.call(viewer.next_chunk)
            if result is None:
                await ws.send_json({"type": "end"})
                return
            chunk, frames, seconds = result
            await ws.send_json({"type": "chunk", "first_frame": chunk.first_frame, "latent_start": chunk.latent_start,
                                "timestamps": chunk.timestamps.tolist(), "prompt": chunk.prompt,
                                "context": chunk.context, "generated_s": seconds})
            for frame in frames:
                await ws.send_bytes(frame)
            first_sent = first_sent or time.perf_counter()
    except (disconnect_error, OSError):  # the viewer left mid-send (uvicorn's ClientDisconnected is an OSError)
        pass
    finally:
        receiver.cancel()
        viewer.stream = None
        # frees the caches (and the CUDA graphs captured against them); queued on the model's thread, so it runs
        # after a chunk still in flight and before the next viewer's stream starts; shielded: a cancelled wait
        # would otherwise cancel the queued call itself
        await asyncio.shield(asyncio.wrap_future(viewer.worker.submit(stream.stop)))


async def handle_messages(ws, viewer: Viewer, inbox: asyncio.Queue, wait: float) -> bool:
    """Apply what the viewer sent (waiting up to `wait` seconds for it); False when it stopped or left."""
    deadline = time.perf_counter() + wait
    while True:
        try:
            text = await asyncio.wait_for(inbox.get(), max(deadline - time.perf_counter(), 0.0)) if wait > 0 \
                else inbox.get_nowait()
        except (asyncio.TimeoutError, asyncio.QueueEmpty):
            return True
        if text is None:
            return False
        try:
            message = json.loads(text)
            kind = message.get("type") if isinstance(message, dict) else None
            if kind == "stop":
                await ws.send_json({"type": "end"})
                await ws.close()
                return False
            if kind != "switch":
                raise ValueError(f"unknown message {text[:80]!r}: expected {{\"type\": \"switch\", \"prompt\": ...}} "
                                 "or {\"type\": \"stop\"}")
            prompt, recache = message.get("prompt"), message.get("recache")
            if recache is not None and not isinstance(recache, bool):
                raise ValueError(f"recache={recache!r}: expected true, false or null (the server's stream.recache)")
            stream = viewer.stream
            seconds = await viewer.call(stream.switch, prompt, recache)
            await ws.send_json({"type": "switched", "prompt": prompt, "latent_frame": stream.frame, "time": seconds,
                                "recache": stream.recache if recache is None else recache})
        except ValueError as e:
            await ws.send_json({"type": "error", "message": str(e)})
        except json.JSONDecodeError:
            await ws.send_json({"type": "error", "message": f"not JSON: {text[:80]!r}"})


def make_app(viewer: Viewer):
    """The Starlette app: the page at /, the stream at /stream."""
    Starlette, HTMLResponse, Route, WebSocketRoute, WebSocketDisconnect = web_libraries()

    async def page(request):
        return HTMLResponse(PAGE.replace("__PROMPT__", json.dumps(viewer.prompt)))

    async def stream(ws):
        await session(ws, viewer, WebSocketDisconnect)

    app = Starlette(routes=[Route("/", page), WebSocketRoute("/stream", stream)])
    app.state.viewer = viewer
    return app


def load(overrides: list[str], **viewer_args) -> Viewer:
    """A Viewer of the student that inference.py would build from these key=value overrides."""
    from hydra import compose, initialize_config_dir

    from engine.inference import prepare
    from engine.items import is_timeline
    from engine.student import group_overrides
    from utils.distributed import pick_device
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        cfg = compose("inference", overrides=list(overrides))
    if is_timeline(cfg.prompts):
        raise ValueError(f"prompts={cfg.prompts}: the viewer switches prompts from its page; give one prompt")
    plan = prepare(cfg, group_overrides(list(overrides)), pick_device(cfg))
    settings = OmegaConf.to_object(cfg.stream) if OmegaConf.is_config(cfg.stream) else cfg.stream
    first = plan.items[0]
    return Viewer(plan.student, first.prompt, first.seed, settings=settings, fps=cfg.fps, context=plan.context,
                  **viewer_args)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--codec", choices=CODECS, default="jpeg", help="frames as JPEG files or raw RGB bytes")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (1-100)")
    p.add_argument("--ahead", type=float, default=2.0,
                   help="seconds of video generated ahead of playback at most (0: as fast as the client takes them)")
    p.add_argument("overrides", nargs="*", help="inference.py's key=value overrides, e.g. checkpoint=<run dir>")
    args = p.parse_intermixed_args(argv)  # key=value overrides before, between or after the --flags
    from utils.errors import one_line_errors

    with one_line_errors(hint="HYDRA_FULL_ERROR=1"):
        viewer = load(args.overrides, codec=args.codec, quality=args.quality, ahead=args.ahead)
        app = make_app(viewer)
    try:
        import uvicorn
    except ImportError as e:
        raise SystemExit(f"scripts/serve.py needs uvicorn ({e}): pip install -r requirements.txt") from e
    log.info("serving %s on http://%s:%d (first prompt %r, seed %d)", viewer.student.__class__.__name__, args.host,
             args.port, viewer.prompt, viewer.seed)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", ws="websockets-sansio")


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>stream viewer</title>
<style>
 body { font: 14px sans-serif; margin: 1.5em; background: #111; color: #ddd; }
 canvas { background: #000; image-rendering: pixelated; width: min(90vw, 832px, 72vh); display: block; }
 form { margin: .8em 0; display: flex; gap: .5em; max-width: 832px; }
 input[type=text] { flex: 1; font-size: 15px; padding: .3em; }
 #log { color: #9a9; white-space: pre-line; font-size: 12px; max-width: 832px; }
 #stats { color: #aaa; }
</style></head>
<body>
<canvas id="screen" width="16" height="16"></canvas>
<div id="stats">connecting...</div>
<form id="form"><input id="prompt" type="text" autocomplete="off">
 <label><input id="recache" type="checkbox" checked> re-cache</label><button>switch</button>
 <button type="button" id="stop">stop</button></form>
<div id="log"></div>
<script>
const screen = document.getElementById("screen"), ctx = screen.getContext("2d");
const stats = document.getElementById("stats"), logBox = document.getElementById("log");
const promptBox = document.getElementById("prompt");
promptBox.value = __PROMPT__;
const say = (line) => { logBox.textContent = line + "\\n" + logBox.textContent.slice(0, 2000); };
const params = new URLSearchParams(location.search);
const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/stream"
                         + (params.toString() ? "?" + params : ""));
ws.binaryType = "arraybuffer";
let info = null, header = null, received = 0, queue = [], clock = 0, last = null, shown = 0, genFps = 0, prompt = "";
ws.onmessage = async (event) => {
  if (typeof event.data !== "string") {  // a frame of the chunk whose header came last (read before any await)
    const t = header.timestamps[received++], madeUnder = header.prompt;
    let image;
    if (info.codec === "raw") {
      const rgb = new Uint8Array(event.data), rgba = new Uint8ClampedArray(info.width * info.height * 4);
      for (let p = 0, q = 0; p < rgb.length; p += 3, q += 4) { rgba[q] = rgb[p]; rgba[q+1] = rgb[p+1]; rgba[q+2] = rgb[p+2]; rgba[q+3] = 255; }
      image = new ImageData(rgba, info.width, info.height);
    } else {
      image = await createImageBitmap(new Blob([event.data], {type: "image/jpeg"}));
    }
    queue.push({t: t, image: image, prompt: madeUnder});
    queue.sort((a, b) => a.t - b.t);
    return;
  }
  const m = JSON.parse(event.data);
  if (m.type === "start") {
    info = m; screen.width = m.width; screen.height = m.height; promptBox.value = m.prompt;
    // as large as fits beside the controls, whatever the video's size (a 16x16 toy or 832x480)
    screen.style.width = Math.min(832, innerWidth * 0.9, innerHeight * 0.72 * m.width / m.height) + "px";
    say(`stream: ${m.width}x${m.height} at ${m.fps} fps, window ${m.window}, sink ${m.sink}, re-cache ${m.recache}`);
    document.getElementById("recache").checked = m.recache;
  } else if (m.type === "chunk") {
    header = m; received = 0;
    genFps = m.timestamps.length / Math.max(m.generated_s, 1e-6);
  } else if (m.type === "switched") {
    say(`switch to "${m.prompt}" (re-cache ${m.recache}) from latent frame ${m.latent_frame}, t = ${m.time.toFixed(2)} s`);
  } else if (m.type === "error") {
    say("error: " + m.message);
  } else if (m.type === "end") {
    say("the stream ended");
  }
};
ws.onclose = (e) => say(`disconnected (${e.code}${e.reason ? ": " + e.reason : ""})`);
function draw(now) {
  // the playback clock advances only while the next frame is there: a slow generator stalls, it never skips
  if (last !== null && queue.length) clock += (now - last) / 1000;
  last = now;
  while (queue.length && queue[0].t <= clock) {
    const f = queue.shift();
    if (f.image instanceof ImageData) ctx.putImageData(f.image, 0, 0); else ctx.drawImage(f.image, 0, 0);
    shown++; prompt = f.prompt;
  }
  const buffered = queue.length ? (queue[queue.length - 1].t - clock) : 0;
  if (info) stats.textContent = `t = ${clock.toFixed(2)} s, frames shown ${shown}, buffered ${buffered.toFixed(2)} s, ` +
    `generated at ${genFps.toFixed(1)} fps (${(genFps / info.fps).toFixed(2)}x real time) — "${prompt}"`;
  requestAnimationFrame(draw);
}
requestAnimationFrame(draw);
document.getElementById("form").onsubmit = (e) => {
  e.preventDefault();
  ws.send(JSON.stringify({type: "switch", prompt: promptBox.value, recache: document.getElementById("recache").checked}));
};
document.getElementById("stop").onclick = () => ws.send(JSON.stringify({type: "stop"}));
</script></body></html>
"""


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main()
