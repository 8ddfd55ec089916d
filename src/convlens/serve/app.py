"""The `convlens serve` page: Gradio widgets wired to :mod:`convlens.serve.logic`.

Offline by construction: analytics off (environment and Blocks), a theme with system fonts only (no web
fonts), no CDN, nothing but the local server contacted. Every event that touches a model runs in one
queue (``concurrency_id="model"``, limit 1), so several browser tabs are served one after the other and
never see each other's hooks or results; per-tab data lives in ``gr.State``.
"""
from __future__ import annotations

import base64
import html
import io
import ipaddress
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..attribution import METHODS
from ..errors import ConvlensError
from . import logic

MODEL_QUEUE = "model"
# Draw-tab pictures go inline (PNG data URIs in one HTML output: no cache files per stroke, the fast path) at
# the network's own resolution; the browser enlarges them, crisp
CSS = """
.pixelated img, .cl-fig img { image-rendering: pixelated; }
.cl-row { display: flex; flex-wrap: wrap; gap: 10px; }
.cl-fig { margin: 0 0 8px 0; }
.cl-fig img { display: block; max-width: 100%; height: auto; }
.cl-fig figcaption { font-size: 0.85em; opacity: 0.8; }
"""
FEATURE_HEIGHT, MAP_SIZE = 84, 224  # display sizes (px) of a feature-map row and of a map
TV_DEFAULT = 8.0


def require_gradio():
    """Import Gradio (the optional extra ``convlens[serve]``) or fail with one clear line."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio as gr
    except ImportError:
        raise ConvlensError("convlens serve needs Gradio: pip install 'convlens[serve]'") from None
    return gr


@dataclass
class ServeOptions:
    model: str | None = None
    photo_model: str = "efficientnet-lite0"
    host: str = "127.0.0.1"
    port: int = 7860
    max_upload_bytes: int = logic.MAX_UPLOAD_BYTES
    max_upload_pixels: int = logic.MAX_UPLOAD_PIXELS
    actmax_steps: int = 200


@dataclass
class Sessions:
    draw: logic.Session | None   # a 1-channel network: Draw, Statistics, Activation maximization
    photo: logic.Session         # Photo
    actmax: logic.ActMaxCache


def load_sessions(opts: ServeOptions, loaded=None) -> Sessions:
    """The models of the page: ``loaded`` (else ``opts.model``) and, beside a 1-channel one, the photo model."""
    from ..models import load_model

    loaded = loaded if loaded is not None else load_model(opts.model)
    if loaded.profile.channels == 1:
        draw = logic.draw_session(loaded)
        photo = logic.Session(load_model(opts.photo_model)) if opts.photo_model else logic.Session(loaded)
    else:  # an image model given as --model: only the Photo tab
        draw, photo = None, logic.Session(loaded)
    return Sessions(draw, photo, logic.ActMaxCache(steps=opts.actmax_steps))


def offline_theme(gr):
    """Gradio's base theme with system fonts only (its default asks Google for web fonts)."""
    sans = [gr.themes.Font("system-ui"), gr.themes.Font("Segoe UI"), gr.themes.Font("sans-serif")]
    mono = [gr.themes.Font("ui-monospace"), gr.themes.Font("monospace")]
    return gr.themes.Base(font=sans, font_mono=mono)


def page_error(gr, exc: ConvlensError):
    """A user-facing error shown in the page (the app keeps running)."""
    return gr.Error(str(exc), print_exception=False)


def errors_markdown(errors: dict[str, str]) -> str:
    return "\n".join(f"**{name} failed:** {msg}" for name, msg in errors.items())


# ------------------------------------------------------------------ handlers (thin: logic does the work)
def draw_handler(gr, session: logic.Session):
    def handle(sketch: dict | None, methods: list[str]):
        drawing = sketch.get("composite") if isinstance(sketch, dict) else sketch
        try:
            result = logic.draw_update(session, drawing, methods or [])
        except ConvlensError as exc:
            raise page_error(gr, exc) from None
        if result is None:
            return None, "", "Draw a digit (choose the brush, then draw in the box)."
        return result.probabilities, draw_results_html(session, result), errors_markdown(result.errors)
    return handle


def png_data_uri(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure(rgb: np.ndarray, caption: str, width: int) -> str:
    text = html.escape(caption)
    return (f'<figure class="cl-fig"><img src="{png_data_uri(rgb)}" alt="{text}" width="{width}">'
            f"<figcaption>{text}</figcaption></figure>")


def draw_results_html(session: logic.Session, result: logic.DrawResult) -> str:
    """The Draw tab's pictures: model input and maps, feature maps of every layer, rank overlays."""
    cls = session.loaded.class_names[result.predicted]
    maps = "".join(figure(img, name, MAP_SIZE) for name, img in result.method_maps.items())
    features = "".join(
        f'<div id="draw-features-{layer}">'
        f'{figure(img, f"{layer}: {img_count} filters, one scale", img.shape[1] * max(1, round(FEATURE_HEIGHT / img.shape[0])))}'
        "</div>"
        for layer, img, img_count in ((l, result.feature_maps[l], session.stats[l]["score"].shape[1])
                                      for l in session.layers))
    ranks = "".join(figure(img, f"{layer}: rank for class {cls}", MAP_SIZE) for layer, img in result.rank_overlays.items())
    model_input = figure(logic.to_uint8(result.image28), "model input (20×20 box, centre of mass centred)", MAP_SIZE)
    return (f'<div class="cl-row"><div id="draw-input">{model_input}</div>'
            f'<div id="draw-maps" class="cl-row">{maps}</div></div>'
            f"<h4>feature maps</h4>{features}"
            f"<h4>dominant filter per pixel, coloured by its rank for class {html.escape(cls)} (red = rank 1)</h4>"
            f'<div id="draw-ranks" class="cl-row">{ranks}</div>')


def photo_outputs(session: logic.Session, state: logic.PhotoState, target: int, methods: list[str],
                  out_dir: Path):
    explanation = logic.photo_explain(session, state, target, methods or [])
    name = session.loaded.class_names[target]
    folder = Path(tempfile.mkdtemp(dir=out_dir))  # one folder per answer: tabs never share a file
    npz = folder / f"maps_{target}.npz"
    npz.write_bytes(logic.maps_npz_bytes(explanation, name))
    gallery = [(img, f"{m}: {name}") for m, img in explanation.overlays.items()]
    return gallery, str(npz), errors_markdown(explanation.errors)


def photo_handlers(gr, session: logic.Session, opts: ServeOptions, out_dir: Path):
    def new_photo(choice: str | None, upload: str | None, methods: list[str]):
        try:
            image = logic.photo_input(choice, upload, session, opts.max_upload_bytes, opts.max_upload_pixels)
            state = logic.photo_predict(session, image)
            gallery, npz, errors = photo_outputs(session, state, state.top[0][0], methods, out_dir)
        except ConvlensError as exc:
            raise page_error(gr, exc) from None
        table = [[i + 1, name, index, round(p, 4)] for i, (index, name, p) in enumerate(state.top)]
        radio = gr.Radio(choices=[(f"{name} ({p:.2f})", index) for index, name, p in state.top],
                         value=state.top[0][0])
        picture = logic.enlarge(logic.to_uint8(session.loaded.deprocess(state.x[0])), 224)
        return state, picture, table, radio, gallery, npz, errors

    def on_upload(upload: str | None, methods: list[str]):
        if not upload:
            return (gr.skip(),) * 7
        return new_photo(None, upload, methods)

    def on_choice(choice: str, methods: list[str]):
        return new_photo(choice, None, methods)

    def re_explain(state: logic.PhotoState | None, target: int | None, methods: list[str]):
        if state is None or target is None:
            return gr.skip(), gr.skip(), gr.skip()
        try:
            return photo_outputs(session, state, int(target), methods, out_dir)
        except ConvlensError as exc:
            raise page_error(gr, exc) from None

    return on_upload, on_choice, re_explain


def actmax_handler(gr, session: logic.Session, cache: logic.ActMaxCache):
    names = session.loaded.class_names

    def handle(kind: str, a: str, b: str, layer: str, chan: float, tv: float, progress=gr.Progress(track_tqdm=True)):
        try:
            index_a = int(chan) if kind == "channel" else names.index(a)
            index_b = names.index(b) if kind == "pair" else 0
            image, score, cached = cache.image(session, kind, index_a, index_b, float(tv),
                                               layer=layer if kind == "channel" else None, progress=True)
        except (ConvlensError, ValueError) as exc:
            raise page_error(gr, ConvlensError(str(exc))) from None
        what = {"class": f"class {a}: p = {score:.3f}", "pair": f"classes {a} + {b}: p({a}) + p({b}) = {score:.3f}",
                "channel": f"{layer} channel {index_a}: mean activation {score:.3f}"}[kind]
        return (logic.enlarge(logic.to_uint8(image), 224),
                f"{what} · tv weight {float(tv):g} · {'from the cache' if cached else 'computed now'}")
    return handle


def stats_handler(gr, session: logic.Session):
    names = session.loaded.class_names

    def handle(layer: str, cls: str):
        try:
            picture, rows = logic.stats_view(session, layer, names.index(cls))
        except (ConvlensError, ValueError) as exc:
            raise page_error(gr, ConvlensError(str(exc))) from None
        return logic.enlarge(picture, FEATURE_HEIGHT), rows
    return handle


# ------------------------------------------------------------------ the page
def build_app(sessions: Sessions, opts: ServeOptions, out_dir: Path):
    gr = require_gradio()
    queue = {"concurrency_id": MODEL_QUEUE, "concurrency_limit": 1}
    method_names = list(METHODS)
    with gr.Blocks(analytics_enabled=False, title="convlens", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("## convlens: what does the network see?")
        draw = sessions.draw
        if draw is not None:
            names = draw.loaded.class_names
            with gr.Tab("Draw", elem_id="tab-draw"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=340):  # fixed share: the canvas is laid out once, at load
                        sketch = gr.Sketchpad(label="draw a digit (brush tool)", canvas_size=(280, 280),
                                              type="numpy", image_mode="RGBA", layers=False, elem_id="sketch",
                                              brush=gr.Brush(colors=["#000000"], color_mode="fixed", default_size=16))
                    with gr.Column(scale=1, min_width=340):
                        probs = gr.Label(label="class probabilities", num_top_classes=len(names),
                                         elem_id="draw-probs")
                draw_methods = gr.CheckboxGroup(method_names, value=logic.DRAW_METHODS, label="methods",
                                                elem_id="draw-methods")
                draw_errors = gr.Markdown(elem_id="draw-errors")
                results = gr.HTML(elem_id="draw-results")
                outputs = [probs, results, draw_errors]
                handle = draw_handler(gr, draw)
                sketch.change(handle, [sketch, draw_methods], outputs, show_progress="hidden", **queue)
                draw_methods.input(handle, [sketch, draw_methods], outputs, **queue)

        photo = sessions.photo
        with gr.Tab("Photo", elem_id="tab-photo"):
            photos = list(logic.shipped_photos())
            with gr.Row():
                with gr.Column():
                    choice = gr.Dropdown(photos, value=None, label="a shipped photo", elem_id="photo-choice")
                    # a File, not an Image: Gradio would decode an Image upload before our limits apply
                    upload = gr.File(label=f"or upload one (≤ {opts.max_upload_bytes / 1e6:g} MB, "
                                           f"≤ {opts.max_upload_pixels / 1e6:g} megapixels)",
                                     file_types=["image"], type="filepath", elem_id="photo-upload")
                    photo_input = gr.Image(label="model input", interactive=False, height=240, format="png",
                                           elem_id="photo-input", elem_classes=["pixelated"])
                with gr.Column():
                    top = gr.Dataframe(headers=["rank", "class", "index", "probability"], label="top 5",
                                       interactive=False, elem_id="photo-top")
                    target = gr.Radio([], label="explained class", elem_id="photo-target")
            photo_methods = gr.CheckboxGroup(method_names, value=logic.PHOTO_METHODS, label="methods",
                                             elem_id="photo-methods")
            photo_errors = gr.Markdown(elem_id="photo-errors")
            photo_maps = gr.Gallery(label="maps", columns=4, height="auto", elem_id="photo-maps", format="png",
                                    object_fit="contain", elem_classes=["pixelated"])
            npz = gr.File(label="raw maps (.npz)", interactive=False, elem_id="photo-npz")
            state = gr.State(None)
            on_upload, on_choice, re_explain = photo_handlers(gr, photo, opts, out_dir)
            new_outputs = [state, photo_input, top, target, photo_maps, npz, photo_errors]
            upload.upload(on_upload, [upload, photo_methods], new_outputs, **queue)
            choice.input(on_choice, [choice, photo_methods], new_outputs, **queue)
            for trigger in (target.input, photo_methods.input):
                trigger(re_explain, [state, target, photo_methods], [photo_maps, npz, photo_errors], **queue)

        if draw is not None:
            with gr.Tab("Activation maximization", elem_id="tab-actmax"):
                with gr.Row():
                    kind = gr.Radio(["class", "pair", "channel"], value="class", label="maximize",
                                    elem_id="actmax-kind")
                    class_a = gr.Dropdown(names, value=names[0], label="class", elem_id="actmax-a")
                    class_b = gr.Dropdown(names, value=names[min(1, len(names) - 1)], label="second class (pair)",
                                          elem_id="actmax-b")
                    layer = gr.Dropdown(draw.layers, value=draw.layers[-1], label="layer (channel)",
                                        elem_id="actmax-layer")
                    chan = gr.Number(0, precision=0, minimum=0, label="channel", elem_id="actmax-channel")
                    tv = gr.Slider(0, 32, value=TV_DEFAULT, step=0.125, label="tv weight", elem_id="actmax-tv")
                go = gr.Button("show", variant="primary", elem_id="actmax-go")
                actmax_image = gr.Image(label="image", interactive=False, height=260, elem_id="actmax-image",
                                        format="png", elem_classes=["pixelated"])
                actmax_info = gr.Markdown(elem_id="actmax-info")
                go.click(actmax_handler(gr, draw, sessions.actmax), [kind, class_a, class_b, layer, chan, tv],
                         [actmax_image, actmax_info], **queue)

            with gr.Tab("Statistics", elem_id="tab-stats"):
                gr.Markdown("Per-class filter statistics of the run on the MNIST test set "
                            "(docs/filter-statistics.md): each filter's class-mean map, ordered by rank.")
                with gr.Row():
                    stats_layer = gr.Dropdown(draw.layers, value=draw.layers[0], label="layer", elem_id="stats-layer")
                    stats_class = gr.Dropdown(names, value=names[0], label="class", elem_id="stats-class")
                stats_image = gr.Image(label="class-mean maps by rank (left = rank 1)", interactive=False,
                                       elem_id="stats-image", format="png", elem_classes=["pixelated"])
                stats_table = gr.Dataframe(headers=logic.STATS_COLUMNS, interactive=False, elem_id="stats-table")
                handle_stats = stats_handler(gr, draw)
                for trigger in (stats_layer.change, stats_class.change):
                    trigger(handle_stats, [stats_layer, stats_class], [stats_image, stats_table], **queue)
                demo.load(handle_stats, [stats_layer, stats_class], [stats_image, stats_table], **queue)
    return demo


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(opts: ServeOptions) -> None:
    if opts.max_upload_bytes <= 0 or opts.max_upload_pixels <= 0:
        raise ConvlensError("upload limits must be positive")
    if not 0 < opts.port < 65536:
        raise ConvlensError(f"--port must be 1..65535, got {opts.port}")
    if opts.actmax_steps <= 0:
        raise ConvlensError(f"--steps must be positive, got {opts.actmax_steps}")


def serve(opts: ServeOptions, block: bool = True, loaded=None) -> Any:
    """Load the models (``loaded``, else ``opts.model``), build the page and serve it on ``opts.host:opts.port``
    (loopback by default)."""
    gr = require_gradio()
    check_options(opts)
    if not is_loopback(opts.host):
        print(f"convlens: warning: serving on {opts.host}: reachable from other machines", file=sys.stderr)
    sessions = load_sessions(opts, loaded)
    out_dir = Path(tempfile.mkdtemp(prefix="convlens-serve-"))
    demo = build_app(sessions, opts, out_dir)
    demo.queue(default_concurrency_limit=1, api_open=False)
    try:
        demo.launch(server_name=opts.host, server_port=opts.port, theme=offline_theme(gr), css=CSS,
                    max_file_size=opts.max_upload_bytes, show_error=True, ssr_mode=False, quiet=True,
                    footer_links=["settings"], prevent_thread_lock=True, inbrowser=False,
                    allowed_paths=[str(out_dir)], mcp_server=False, pwa=False)
    except OSError as exc:
        raise ConvlensError(f"cannot serve on {opts.host}:{opts.port}: {exc.strerror or exc}") from None
    print(f"convlens serve: {demo.local_url}  (Ctrl-C stops it)", flush=True)
    if block:
        demo.block_thread()
    return demo
