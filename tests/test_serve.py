"""scripts/serve.py headless: the viewer built from a toy export (random weights) through inference's loading, a
websocket client that receives frames, switches the prompt and stops; the frames are exactly those of a Stream
driven directly with the same switch, so the switch reached the model."""

import json

import numpy as np
import pytest
import torch

from starlette.testclient import TestClient  # needs httpx; both in requirements.txt  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402

from engine.stream import Stream, StreamSchema  # noqa: E402
from scripts import serve  # noqa: E402
from tests.test_inference_safety import export  # noqa: E402,F401  (a fixture: a toy export with random weights)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread on the shared CPU

P, Q = "a red circle moving left", "a blue square moving up"
SIDE = 8  # the test export's frames (tests/test_inference_safety.py compose_config)


@pytest.fixture(scope="module")
def viewer(export):
    return serve.load([f"checkpoint={export}", "device=cpu", f"prompts=[{P}]", "seed=3", "stream.window=6"],
                      codec="raw", ahead=0)


def read_chunk(ws, header: dict | None = None) -> tuple[dict, np.ndarray]:
    header = header or ws.receive_json()
    assert header["type"] == "chunk", header
    frames = [np.frombuffer(ws.receive_bytes(), dtype=np.uint8) for _ in header["timestamps"]]
    return header, np.stack(frames).reshape(len(frames), SIDE, SIDE, 3)


def until(ws, kind: str) -> tuple[dict, list]:
    """Read messages up to the first of type `kind`: (it, the chunks that came before it)."""
    chunks = []
    while (message := ws.receive_json())["type"] == "chunk":
        chunks.append(read_chunk(ws, message))
    assert message["type"] == kind, message
    return message, chunks


def test_the_viewer_streams_frames_and_a_switch_reaches_the_model(viewer):
    client = TestClient(serve.make_app(viewer))
    page = client.get("/")
    assert page.status_code == 200 and "new WebSocket" in page.text and json.dumps(P) in page.text
    with client.websocket_connect("/stream") as ws:
        start = ws.receive_json()
        assert start == {"type": "start", "fps": 16, "width": SIDE, "height": SIDE, "prompt": P, "seed": 3, "codec": "raw",
                         "window": 6, "sink": 0, "recache": True}
        chunks = [read_chunk(ws) for _ in range(2)]
        ws.send_json({"type": "switch", "prompt": Q, "recache": True})
        reply, before = until(ws, "switched")  # chunks already started come first, under P
        chunks += before
        assert reply["prompt"] == Q and reply["recache"] and reply["latent_frame"] >= 4
        assert reply["time"] == viewer.stream.time_of(reply["latent_frame"]) == reply["latent_frame"] / 16  # the toy: 1 frame each
        chunks += [read_chunk(ws) for _ in range(3)]
        ws.send_json({"type": "switch", "prompt": "a purple circle moving left"})  # not a toy-world word
        error, more = until(ws, "error")
        chunks += more
        assert "unknown word 'purple'" in error["message"] and "\n" not in error["message"]
        stream = viewer.stream
        assert stream.prompt == Q and stream.switches == [(reply["latent_frame"], Q, True)]  # what the model runs under
        ws.send_json({"type": "stop"})
        chunks += until(ws, "end")[1]
    viewer.worker.submit(lambda: None).result()  # the server's last call on the model's thread has run
    assert viewer.stream is None and stream.kv is None  # the stream was stopped, its caches freed
    # the server's frames are those of a stream driven directly with the same switch
    switch = reply["latent_frame"]
    reference = Stream(viewer.student, P, 3, settings=StreamSchema(window=6))
    reference.switch(Q, at=switch)
    for header, frames in chunks:
        ref = next(reference)
        assert header["latent_start"] == ref.latent_start and header["prompt"] == ref.prompt
        assert header["prompt"] == (Q if ref.latent_start >= switch else P) and not header["context"]
        assert header["timestamps"] == ref.timestamps.tolist() and np.array_equal(frames, ref.frames.numpy())
    assert len(chunks) >= 5 and chunks[-1][0]["latent_start"] > switch
    plain = Stream(viewer.student, P, 3, settings=StreamSchema(window=6))
    unswitched = [next(plain) for _ in chunks]
    assert np.array_equal(chunks[0][1], unswitched[0].frames.numpy())
    assert not np.array_equal(chunks[-1][1], unswitched[-1].frames.numpy())  # the new prompt changed the video


def test_one_viewer_at_a_time_and_bad_starts_are_one_line(viewer):
    client = TestClient(serve.make_app(viewer))
    with client.websocket_connect("/stream?prompt=a%20green%20triangle%20moving%20down&seed=1") as ws:
        start = ws.receive_json()
        assert start["prompt"] == "a green triangle moving down" and start["seed"] == 1
        read_chunk(ws)
        with client.websocket_connect("/stream") as second:
            assert second.receive_json() == {"type": "error",
                                             "message": "another viewer is watching this server: one stream at a time"}
            with pytest.raises(WebSocketDisconnect) as closed:
                second.receive_json()
            assert closed.value.code == serve.BUSY_CODE
        read_chunk(ws)  # the first viewer's stream goes on
        ws.send_json({"type": "hello"})
        assert until(ws, "error")[0]["message"].startswith("unknown message")
    for query, words in [("seed=x", "seed='x': expected an integer"), ("prompt=%20", "prompt must be a non-empty string")]:
        with client.websocket_connect(f"/stream?{query}") as ws:
            message = ws.receive_json()
            assert message["type"] == "error" and words in message["message"]
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == serve.BAD_INPUT_CODE
    assert viewer.stream is None


def test_jpeg_frames_and_bad_viewer_settings(viewer):
    jpeg = serve.encode_frames(torch.full((2, 16, 16, 3), 200, dtype=torch.uint8), "jpeg", 95)
    assert len(jpeg) == 2 and jpeg[0][:2] == b"\xff\xd8"  # JPEG files
    from PIL import Image
    import io

    assert abs(np.asarray(Image.open(io.BytesIO(jpeg[0]))).astype(int) - 200).max() <= 2
    for kwargs, message in [(dict(codec="png"), "--codec 'png': expected one of jpeg, raw"),
                            (dict(quality=0), "--quality 0"), (dict(ahead=-1), "--ahead -1")]:
        with pytest.raises(ValueError, match=message):
            serve.Viewer(viewer.student, P, **kwargs)
    with pytest.raises(ValueError, match="stream.window=5 must be a positive multiple"):
        serve.Viewer(viewer.student, P, settings=StreamSchema(window=5))
