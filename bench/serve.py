"""Server-side time of `convlens serve` per update, against the bare model work in the same run.

* drawing update on the lab network with the Draw tab's default methods (median of 50; target ≤ 100 ms):
  the handler (sketch → MNIST input → probabilities, feature maps, rank overlays, maps) plus Gradio's
  post-processing of every output (PNG encoding into its cache), i.e. everything the server does;
* photo update on EfficientNet-Lite0 with Grad-CAM + guided Grad-CAM (target ≤ 1 s): read and check the
  upload, predict, explain the top class, write the .npz, plus Gradio's post-processing.

Reference in the same run: the forward pass and the methods alone on the same input (what no page can avoid).

    python bench/serve.py [--model convlens-out/lab/train] [--threads 1] [--draws 50] [--photos 10]

--threads defaults to 1, as `convlens serve` does.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from common import setup  # noqa: E402
from convlens.attribution import make_method, uses_layer  # noqa: E402
from convlens.serve import app, logic  # noqa: E402

SKETCHES = [  # strokes on the page's 280×280 canvas: a 1, a 7, an L, a 4-like cross, a 0-like box
    [[(140, 40), (135, 240)]],
    [[(70, 50), (210, 50), (120, 240)]],
    [[(90, 40), (90, 230), (200, 230)]],
    [[(80, 40), (80, 150), (220, 150)], [(180, 60), (180, 250)]],
    [[(80, 60), (200, 60), (200, 230), (80, 230), (80, 60)]],
]


def sketch(strokes) -> np.ndarray:
    img = Image.new("RGBA", (280, 280), (255, 255, 255, 255))
    draw = ImageDraw.Draw(img)
    for stroke in strokes:
        draw.line(stroke, fill=(0, 0, 0, 255), width=16, joint="curve")
    return np.asarray(img)


def samples(fn, n: int, warmup: int = 2) -> list[float]:
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - start)
    return out


def components_by_id(demo) -> dict:
    return {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}


def postprocess_all(components: list, values) -> None:
    for component, value in zip(components, values):
        if hasattr(component, "postprocess"):
            component.postprocess(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convlens-out/lab/train")
    parser.add_argument("--photo-model", default="efficientnet-lite0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--photos", type=int, default=10)
    a = parser.parse_args()
    setup(a.threads)
    gr = app.require_gradio()

    opts = app.ServeOptions(model=a.model, photo_model=a.photo_model)
    sessions = app.load_sessions(opts)
    out_dir = Path(tempfile.mkdtemp(prefix="convlens-bench-serve-"))
    demo = app.build_app(sessions, opts, out_dir)
    by_id = components_by_id(demo)
    draw = sessions.draw
    drawings = [sketch(s) for s in SKETCHES]

    # ---- drawing update
    draw_outputs = [by_id[k] for k in ["draw-probs", "draw-results", "draw-errors"]]
    handle_draw = app.draw_handler(gr, draw)

    def full_draw(i):
        postprocess_all(draw_outputs, handle_draw({"composite": drawings[i % len(drawings)]}, logic.DRAW_METHODS))

    def logic_draw(i):
        logic.draw_update(draw, drawings[i % len(drawings)], logic.DRAW_METHODS)

    inputs = [torch.from_numpy(logic.mnist_from_ink(logic.ink_from_drawing(d)))[None, None] for d in drawings]

    def bare_draw(i):
        x = inputs[i % len(inputs)]
        with torch.no_grad():
            target = int(draw.loaded.model(x).argmax())
        for name in logic.DRAW_METHODS:
            make_method(name, draw.loaded.model, layer=draw.cam_layer if uses_layer(name) else None).attribute(x, target)

    n = a.draws
    full, only_logic, bare = samples(full_draw, n), samples(logic_draw, n), samples(bare_draw, n)
    med = {k: statistics.median(v) * 1000 for k, v in (("full", full), ("logic", only_logic), ("bare", bare))}
    print(f"drawing update, lab network, methods {','.join(logic.DRAW_METHODS)}, {a.threads} threads, median of {n}:")
    print(f"  server side (handler + Gradio post-processing): {med['full']:7.1f} ms   target ≤ 100 ms: "
          f"{'met' if med['full'] <= 100 else 'NOT met'}")
    print(f"  page logic only (draw_update):                  {med['logic']:7.1f} ms")
    print(f"  reference: forward + the methods alone:         {med['bare']:7.1f} ms   "
          f"server / reference = {med['full'] / med['bare']:.2f}")

    # ---- photo update
    photo = sessions.photo
    on_upload, _, _ = app.photo_handlers(gr, photo, opts, out_dir)
    photo_path = str(logic.shipped_photos()["chelsea.png"])
    photo_outputs = [by_id[k] for k in ["photo-input", "photo-top", "photo-target", "photo-maps", "photo-npz",
                                        "photo-errors"]]
    methods = ["gradcam", "guided-gradcam"]

    def full_photo(_):
        values = on_upload(photo_path, methods)
        postprocess_all(photo_outputs, values[1:])

    x = photo.loaded.preprocess(logic.read_upload(photo_path, "RGB"))[None]

    def bare_photo(_):
        with torch.no_grad():
            target = int(photo.loaded.model(x).argmax())
        for name in methods:
            make_method(name, photo.loaded.model, layer=photo.cam_layer if uses_layer(name) else None).attribute(x, target)

    full_p, bare_p = samples(full_photo, a.photos, warmup=1), samples(bare_photo, a.photos, warmup=1)
    fp, bp = statistics.median(full_p), statistics.median(bare_p)
    print(f"photo update, {photo.loaded.name}, {','.join(methods)}, median of {a.photos}:")
    print(f"  server side (read, predict, explain, .npz, Gradio post-processing): {fp * 1000:7.1f} ms   "
          f"target ≤ 1000 ms: {'met' if fp <= 1.0 else 'NOT met'}")
    print(f"  reference: forward + the methods alone:                              {bp * 1000:7.1f} ms   "
          f"server / reference = {fp / bp:.2f}")


if __name__ == "__main__":
    main()
