"""The ``convlens`` command line: one subcommand per capability.

User errors print one line on stderr and exit with code 2; no traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path
from typing import Callable

from .errors import ConvlensError
from .io import display
from .runtime import tune_malloc

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def command(func):
    COMMANDS[func.__name__.removeprefix("cmd_").replace("_", "-")] = func
    return func


SEGMENTATION_COMMANDS = {"summary", "predict", "explain"}  # the others need (N, classes) scores


def model_from(a: argparse.Namespace):
    """The model named by --model (with --weights and --profile); a segmentation model only where the
    command takes one."""
    from .models import load_model

    loaded = load_model(a.model, weights=getattr(a, "weights", None), profile=getattr(a, "profile", None))
    if loaded.profile.output_grid is not None and a.command not in SEGMENTATION_COMMANDS:
        raise ConvlensError(f"{a.command} needs a classifier's (N, classes) scores; this model returns a "
                            "segmentation output (N, C, H, W) (explain it with convlens explain --target-region)")
    return loaded


def int_list(text: str) -> list[int]:
    """'0-9' or '1,3,5' or '0-2,7' → list of ints."""
    out: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    return out


def float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None


def str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def pair_list(text: str) -> list[tuple[int, int]]:
    """'1+7,4+9' → [(1, 7), (4, 9)]."""
    pairs = []
    for part in str_list(text):
        a, plus, b = part.partition("+")
        if not (plus and a.strip().isdigit() and b.strip().isdigit()):
            raise argparse.ArgumentTypeError(f"{part!r} is not a pair of class indices like 1+7")
        pairs.append((int(a), int(b)))
    return pairs


def positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text!r}")
    return value


MAX_SEED = 2**32 - 1


def seed_int(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{MAX_SEED}, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def set_threads(threads: int | None) -> None:
    """Pick the thread count once, at start-up (changing it later slows torch down badly)."""
    import torch

    if threads is not None:
        if threads <= 0:
            raise ConvlensError(f"--threads must be positive, got {threads}")
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- commands
@command
def cmd_train(a: argparse.Namespace) -> int:
    from .training import make_recipe, train

    recipe = make_recipe(a.recipe, a.epochs, a.batch_size, a.lr)
    metrics = train(a.out, recipe, seed=a.seed, resume=a.resume, progress=not a.quiet, subset=a.subset,
                    device=a.device)
    print(f"test accuracy {metrics['test_accuracy']:.4f}, test loss {metrics['test_loss']:.4f}")
    print(display(Path(a.out) / "model.pt"))
    return 0


@command
def cmd_summary(a: argparse.Namespace) -> int:
    from .models import LabNet, summary_table
    from .models.summary import describe

    if not a.model:
        print(summary_table(LabNet()))
        return 0
    print(describe(model_from(a)))
    return 0


@command
def cmd_predict(a: argparse.Namespace) -> int:
    from .data.images import sample_photo_paths
    from .explain import format_table, sharded_predictions
    from .io import write_json

    result = sharded_predictions(model_from(a), a.images or sample_photo_paths(), a.top)
    if result is None:  # not the writing rank of a distributed run
        return 0
    rows, failures = result
    if a.json:
        write_json(a.json, rows)
    print(format_table(rows))
    return 1 if failures else 0


@command
def cmd_explain(a: argparse.Namespace) -> int:
    from .data.images import sample_photo_paths
    from .explain import explain

    from .explain_targets import parse_grid
    from .models.profile import TokenLayout

    if (a.drop_tokens is not None or a.grid is not None) and not a.tokens:
        raise ConvlensError("--drop-tokens and --grid apply only with --tokens")
    tokens = TokenLayout(a.drop_tokens or 0, parse_grid(a.grid) if a.grid else None) if a.tokens else None
    loaded = model_from(a)
    summary = explain(loaded, a.images or sample_photo_paths(), a.out, a.methods, a.target, a.layer,
                      progress=not a.quiet, batch_size=a.batch_size, region=a.target_region, tokens=tokens,
                      resume=a.resume)
    if summary is None:  # not the writing rank of a distributed run
        return 0
    print(display(Path(a.out) / "predictions.json"))
    return 1 if summary["skipped"] else 0


@command
def cmd_featuremaps(a: argparse.Namespace) -> int:
    from .analysis import featuremaps

    featuremaps(model_from(a), a.out, a.layers, a.digit, a.index, a.image)
    print(display(Path(a.out) / "featuremaps.json"))
    return 0


@command
def cmd_stats(a: argparse.Namespace) -> int:
    from .analysis import statistics

    summary = statistics(model_from(a), a.out, a.layers, a.split, a.correct_only, a.data, a.limit, not a.quiet,
                         a.resume)
    if summary is None:  # not the writing rank of a distributed run
        return 0
    print(display(Path(a.out) / "stats.json"))
    return 1 if summary.get("skipped") else 0


@command
def cmd_actmax(a: argparse.Namespace) -> int:
    from .featvis.run import actmax

    loaded = model_from(a)
    pairs = a.pairs or []
    if a.channels and not a.layer:
        raise ConvlensError("--channels needs --layer")
    classes = a.classes if a.classes is not None else list(range(min(10, len(loaded.class_names))))
    actmax(loaded, a.out, classes, a.tv_weights, pairs, a.layer, a.channels or ([] if not a.layer else list(range(9))),
           a.steps, a.mode, a.seed, a.param, not a.quiet, prior=a.prior, restarts=a.restarts)
    print(display(Path(a.out) / "actmax.json"))
    return 0


@command
def cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluation.run import evaluate

    summary = evaluate(model_from(a), a.out, a.methods, a.images, a.mnist_test, a.steps, a.sanity_images,
                       not a.no_data_randomization, a.seed, not a.quiet, a.resume)
    if summary is None:  # not the writing rank of a distributed run
        return 0
    rows = summary["table"]
    print(f"{'method':<26}{'deletion':>9}{'insertion':>10}{'avg drop':>9}{'incr conf':>10}{'s/image':>9}")
    for name, r in rows.items():
        print(f"{name:<26}{r['deletion_auc']:>9.3f}{r['insertion_auc']:>10.3f}{r['average_drop']:>9.1f}"
              f"{r['increase_in_confidence']:>10.1f}{r['seconds_per_image']:>9.3f}")
    print(display(Path(a.out) / "evaluation.json"))
    return 1 if summary.get("skipped") else 0


@command
def cmd_report(a: argparse.Namespace) -> int:
    from .report.generic import ReportOptions, run_report

    path = run_report(model_from(a), ReportOptions(Path(a.out), Path(a.data), a.methods, a.per_class, a.seed,
                                                     not a.quiet, a.limit))
    if path is None:  # not the writing rank of a distributed run
        return 0
    print(path.resolve())
    return 0


@command
def cmd_serve(a: argparse.Namespace) -> int:
    from .serve.app import ServeOptions, check_options, require_gradio, serve

    require_gradio()  # before loading any model: a missing extra or a bad option is one line, at once
    if a.threads is None:  # one request at a time on small inputs: more intra-op threads only add contention
        set_threads(1)
    opts = ServeOptions(model=a.model, photo_model=a.photo_model, host=a.host, port=a.port,
                        max_upload_bytes=int(a.max_upload_mb * 1e6),
                        max_upload_pixels=int(a.max_upload_megapixels * 1e6), actmax_steps=a.steps)
    check_options(opts)
    serve(opts, loaded=model_from(a))
    return 0


@command
def cmd_lab(a: argparse.Namespace) -> int:
    from .report.lab import LabOptions, run_lab

    path = run_lab(LabOptions(Path(a.out), a.retrain, a.fast, a.seed, not a.quiet))
    if path is None:  # not the writing rank of a distributed run
        return 0
    print(path.resolve())
    return 0


def add_common(p: argparse.ArgumentParser, model_default: str | None = None, out: str | None = None) -> None:
    p.add_argument("--model", default=model_default,
                   help="'efficientnet-lite0', a training run folder or checkpoint, a factory file.py:name or "
                        "package.module:name (with --weights), or an .onnx file")
    p.add_argument("--weights", help="state_dict (.pt/.pth, read weights-only) or .safetensors for a factory")
    p.add_argument("--profile", help="profile JSON of your model: input size, preprocessing, class names, layers")
    if out:
        p.add_argument("--out", default=out, help="output folder (default: %(default)s)")


def add_resume(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true",
                   help="reuse the finished shards checkpointed in OUT/.convlens-work by an interrupted run")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .models.registry import DEFAULT_RUN

    parser = Parser(prog="convlens", description="See what a CNN has learned and why it decides.")
    parser.add_argument("--version", action="version", version=f"convlens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=SubParser)

    p = sub.add_parser("train", help="train the lab network on the shipped MNIST")
    p.add_argument("--out", default=DEFAULT_RUN)
    p.add_argument("--recipe", default="best", choices=["lab", "best"])
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train (default cpu)")
    p.add_argument("--subset", type=positive_int, help=argparse.SUPPRESS)

    p = sub.add_parser("summary", help="the architecture table (lab network) or any model's profile and layers")
    add_common(p)

    p = sub.add_parser("predict", help="top-k predictions for images (table like the report's)")
    p.add_argument("images", nargs="*", help="image files or folders (default: the shipped photos)")
    add_common(p, "efficientnet-lite0")
    p.add_argument("--top", type=positive_int, default=5)
    p.add_argument("--json", help="also write the rows to this JSON file")

    p = sub.add_parser("explain", help="attribution maps (Grad-CAM, guided Grad-CAM, …) for images")
    p.add_argument("images", nargs="*", help="image files or folders (default: the shipped photos)")
    add_common(p, "efficientnet-lite0", "convlens-out/explain")
    p.add_argument("--methods", type=str_list, help="comma-separated, KIND:METHOD for a noise tunnel "
                   "(smoothgrad:gradcam), or 'all'; default: gradcam,guided-gradcam,…")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--target", help="class index or name, or 'predicted' (default)")
    group.add_argument("--target-region", metavar="CLASS:MASK.png|CLASS:x0,y0,x1,y1",
                       help="segmentation models: the class summed over a region of the output grid, given as a "
                            "mask image (nonzero = in; resized to the output's H×W) or a box in output pixels")
    p.add_argument("--layer", help="module path of the CAM layer (default: automatic)")
    p.add_argument("--tokens", action="store_true",
                   help="the CAM layer is a token layer (N, tokens, C): read it as a grid")
    p.add_argument("--drop-tokens", type=nonnegative_int, metavar="K",
                   help="with --tokens: drop K leading tokens (a class token: 1)")
    p.add_argument("--grid", metavar="HxW", help="with --tokens: the token grid (default: square)")
    p.add_argument("--batch-size", type=positive_int,
                   help="images per batch (default: as many as fit in memory, at most 32)")
    add_resume(p)

    p = sub.add_parser("featuremaps", help="feature maps of one input and of every digit; l1 kernels")
    add_common(p, DEFAULT_RUN, "convlens-out/featuremaps")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--digit", type=int, help="first test image of this digit (default 7)")
    group.add_argument("--index", type=nonnegative_int, help="test image index")
    group.add_argument("--image", help="an image file")
    p.add_argument("--layers", type=str_list, help="module paths (default l1,l2,l3)")

    p = sub.add_parser("stats", help="per-class filter activation statistics and their figures")
    add_common(p, DEFAULT_RUN, "convlens-out/stats")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--data", help="a labelled image folder (one sub-folder per class) instead of MNIST")
    p.add_argument("--correct-only", action="store_true", help="only correctly classified samples")
    p.add_argument("--layers", type=str_list, help="module paths (default l1,l2,l3)")
    p.add_argument("--limit", type=positive_int, help="only the first N samples")
    add_resume(p)

    p = sub.add_parser("actmax", help="activation maximization: tv-weight sweep, pairs, channels")
    add_common(p, DEFAULT_RUN, "convlens-out/actmax")
    p.add_argument("--classes", type=int_list, help="e.g. 0-9 (default)")
    p.add_argument("--tv-weights", type=float_list, default=[0.125, 0.25, 0.5, 1, 2, 4, 8, 16])
    p.add_argument("--pairs", type=pair_list, default="1+7,4+9,0+1,7+8")
    p.add_argument("--layer", help="conv layer for channel images")
    p.add_argument("--channels", type=int_list, help="e.g. 0-8")
    p.add_argument("--steps", type=positive_int, default=200)
    p.add_argument("--mode", choices=["default", "kerasvis"], default="default")
    p.add_argument("--param", choices=["pixel", "fourier"], default="pixel", help="fourier: colour models")
    p.add_argument("--prior", choices=["default", "generator"], default="default",
                   help="generator: optimize the latent code of a small MNIST VAE (what the network accepts as "
                        "the class, not its features)")
    p.add_argument("--restarts", type=positive_int, help="random starts per image (pairs too), best kept (default 1; generator 4)")
    p.add_argument("--seed", type=seed_int, default=0)

    p = sub.add_parser("evaluate", help="faithfulness: deletion/insertion, confidence drop, sanity checks")
    add_common(p, DEFAULT_RUN, "convlens-out/evaluate")
    p.add_argument("--methods", type=str_list, help="comma-separated, or 'all'")
    p.add_argument("--images", nargs="+", help="image files or folders (default: MNIST test or the photos)")
    p.add_argument("--mnist-test", type=positive_int, default=100, help="first N MNIST test images (lab network)")
    p.add_argument("--steps", type=positive_int, help="perturbation steps per curve")
    p.add_argument("--sanity-images", type=nonnegative_int, help="images for the sanity checks (0: skip)")
    p.add_argument("--no-data-randomization", action="store_true", help="skip the random-label model")
    p.add_argument("--seed", type=seed_int, default=0)
    add_resume(p)

    p = sub.add_parser("report", help="the lab's whole study of any CNN on a labelled folder → HTML report")
    add_common(p, None, "convlens-out/report")
    p.add_argument("--data", required=True, help="a labelled image folder (one sub-folder per class)")
    p.add_argument("--methods", type=str_list, help="explanation methods (default: gradcam,guided-gradcam,…)")
    p.add_argument("--per-class", type=positive_int, default=2, help="images explained per class (default 2)")
    p.add_argument("--limit", type=positive_int, help="use at most N images of the folder")
    p.add_argument("--seed", type=seed_int, default=0)

    p = sub.add_parser("serve", help="a local web page: draw digits, explain photos, browse statistics, actmax")
    add_common(p, DEFAULT_RUN)
    p.add_argument("--photo-model", default="efficientnet-lite0", help="model of the Photo tab (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload in MB (default: %(default)s)")
    p.add_argument("--max-upload-megapixels", type=float, default=25.0,
                   help="largest uploaded image in megapixels (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="activation-maximization steps")

    p = sub.add_parser("lab", help="the whole PW-11 lab → a self-contained HTML report")
    p.add_argument("--out", default="convlens-out/lab")
    p.add_argument("--retrain", action="store_true", help="train again even if DIR/train has a model")
    p.add_argument("--fast", action="store_true", help="tiny training and subsets (about a minute)")
    p.add_argument("--seed", type=seed_int, default=0)

    return parser


class Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), like every other convlens error."""

    def error(self, message: str):
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


class SubParser(Parser):
    """Every subcommand accepts the shared options --threads and --quiet."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--threads", type=positive_int, default=None, help="torch threads, fixed at start-up")
        self.add_argument("--quiet", action="store_true", help="no progress bars")


@contextlib.contextmanager
def one_line_warnings():
    """Warnings (a flat map, an integrated-gradients completeness gap…) print as one line each; the
    previous format is restored afterwards (main() may be called in-process)."""
    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_args, **_kw: f"convlens: warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = previous


def use_file_backend() -> None:
    """Figures go to files: matplotlib's Agg backend (no display needed), chosen here, not on import."""
    import matplotlib

    matplotlib.use("Agg")


# files each command writes into --out, checked before any work
FINAL_OUTPUTS = {"train": ["model.pt", "checkpoint.pt", "metrics.json"], "explain": ["predictions.json", "maps.npz"],
                 "featuremaps": ["featuremaps.json"], "stats": ["stats.json", "stats.npz"],
                 "actmax": ["actmax.json"], "evaluate": ["evaluation.json"], "lab": ["index.html", "summary.json"],
                 "report": ["index.html", "summary.json"]}
RESUMABLE = {"train", "lab", "report"}  # keep what they wrote: a re-run continues from it


def check_outputs(a: argparse.Namespace) -> None:
    """What can be checked about the outputs before any work: folders, files in the way, --json."""
    from .io import check_out_not_input, check_output_dir, check_output_file

    if getattr(a, "json", None):
        check_output_file(a.json, "--json")
    out = getattr(a, "out", None)
    if out is None:
        return
    check_output_dir(out)
    for name in FINAL_OUTPUTS.get(a.command, []):
        check_output_file(Path(out) / name)
    images = getattr(a, "images", None)
    if images:
        check_out_not_input(out, images)


def allocation_message(exc: BaseException) -> str | None:
    """One line for an allocator failure (MemoryError or torch's "can't allocate"/"out of memory")."""
    import re

    text = str(exc)
    if not isinstance(exc, MemoryError) and not re.search(r"out of memory|can't allocate|cannot allocate", text, re.I):
        return None
    size = re.search(r"allocate (\d+) bytes", text)
    tried = f" (an allocation of {int(size.group(1)) / 2**30:.1f} GiB failed)" if size else ""
    return f"out of memory{tried}; use fewer or smaller images, or --batch-size where the command has it"


def quiet_broken_pipe() -> int:
    """stdout's reader went away (``| head -1``): stop quietly, as a SIGPIPE-killed tool does."""
    import os

    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 141


def main(argv: list[str] | None = None) -> int:
    from .io import rollback_on_error

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        use_file_backend()
        tune_malloc()
        set_threads(args.threads)
        check_outputs(args)
        from . import distributed
        if distributed.launched():
            with one_line_warnings():
                return run_distributed(args) if args.command in SHARDED_COMMANDS else run_on_rank_zero(args)
        guard = contextlib.nullcontext() if args.command in RESUMABLE else rollback_on_error()
        with guard, one_line_warnings():
            code = COMMANDS[args.command](args) or 0
        sys.stdout.flush()
        return code
    except ConvlensError as exc:
        print(f"convlens: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return quiet_broken_pipe()
    except KeyboardInterrupt:
        print("convlens: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        message = allocation_message(exc)
        if message is None:
            raise
        print(f"convlens: error: {message}", file=sys.stderr)
        return 2


SHARDED_COMMANDS = {"stats", "evaluate", "predict", "explain", "report", "lab"}


def run_distributed(args: argparse.Namespace) -> int:
    """One rank of a torchrun job: any failure becomes the job's one error line (see convlens.distributed)."""
    from . import distributed

    from .io import rollback_on_error

    try:
        distributed.setup()
        # a failed rank's outputs go (its checkpoints stay, for --resume); report and lab keep their
        # finished stages, as in one process (each stage removes its own outputs when it fails)
        with contextlib.nullcontext() if args.command in RESUMABLE else rollback_on_error():
            code = COMMANDS[args.command](args) or 0
    except BaseException as exc:  # noqa: BLE001 - every failure of a rank must reach the other ranks
        return distributed.report(exc)
    distributed.teardown()
    return code


def run_on_rank_zero(args: argparse.Namespace) -> int:
    """A command that does not split its work, under torchrun: rank 0 runs it as one process (no process
    group), the other ranks exit at once."""
    from . import distributed
    from .io import rollback_on_error

    if distributed.launch_rank() != 0:
        return 0
    print(f"convlens: {args.command} does not split across ranks; rank 0 runs it alone", file=sys.stderr)
    with contextlib.nullcontext() if args.command in RESUMABLE else rollback_on_error():
        return COMMANDS[args.command](args) or 0


if __name__ == "__main__":
    sys.exit(main())
