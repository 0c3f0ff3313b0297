"""A page to look at a net (``verydeep serve``): drop an image, see each net's top classes and their
fusion (Sec. 3.2, 4.4), the class saliency map of its top class, and, with a localisation run, the
top (class, box) guesses of Appendix A's protocol 2, all in a local browser page.

Every number comes from the functions of the commands: classes from :mod:`verydeep.eval.predict` (so
``POST /api/predict`` returns ``verydeep predict --json``'s object), the saliency map from
:func:`verydeep.eval.predict.saliency_map` (``predict --saliency``), boxes from
:class:`verydeep.eval.localize.dense_nets.DenseNets` (``localize predict``). Nets are loaded once, at
start, and run one request at a time. The page is hand-written HTML, CSS and JavaScript in ``static/``,
served by Starlette through uvicorn (the ``app`` extra); it fetches nothing from the network (its
Content-Security-Policy allows this server alone), so it works offline.

A bad upload (empty, too large, not an image, truncated) is HTTP 400 with ``{"error": ONE LINE}``,
shown on the page; the server carries on.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import logging
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from verydeep.data.datasets import DECODE_ERRORS, images_under, unreadable
from verydeep.data.decode import decode, displayed_size, open_image
from verydeep.errors import UserError
from verydeep.eval.classmap import fusion_orders
from verydeep.eval.evaluate import given_weights
from verydeep.eval.localize.dense_nets import DenseNets
from verydeep.eval.localize.task import smallest_training_scale
from verydeep.eval.nets import Net, load_nets
from verydeep.eval.predict import (
    PROTOCOLS,
    ImagePrediction,
    Prediction,
    chosen_scales,
    image_posteriors,
    load_image,
    ranked_classes,
    saliency_map,
)
from verydeep.eval.sweep import average
from verydeep.io.download import resolve_source
from verydeep.io.jsonable import to_json_dict
from verydeep.io.rundir import run_data_folder
from verydeep.nn.summary import parameter_count
from verydeep.options import add_device, add_precision, add_weights, one_line, parse_scales, positive_int
from verydeep.runtime.device import pick_device
from verydeep.runtime.precision import autocast_dtype

#: The largest upload, in bytes: a 50 M pixel JPEG straight from a camera fits.
MAX_UPLOAD_BYTES = 32 * 2**20
#: The most pixels an uploaded image may have: it is decoded whole once (to refuse a truncated file),
#: 150 MB of RGB at this size.
MAX_UPLOAD_PIXELS = 50_000_000
#: The most classes a request may list.
MAX_TOPK = 100
#: The side of the preview the page draws boxes and the saliency map over.
PREVIEW_SIDE = 768
#: The fields a request may carry, and the image suffixes kept for the decoder.
FIELDS = ("image", "topk", "scales", "protocol", "net")
#: The fields of ``/api/look``, which shows every net.
LOOK_FIELDS = tuple(field for field in FIELDS if field != "net")
IMAGE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,5}")
#: Images offered as examples: at most this many, one per class folder first.
MAX_EXAMPLES = 8
EXAMPLE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})

log = logging.getLogger("verydeep.serve")


@dataclass(frozen=True)
class Ask:
    """What one request asks for: ``topk`` classes, test scales Q (``None``: each net's own), the protocol
    (dense, multi-crop or both, Sec. 3.2), and for ``/api/predict`` which net (its index in --weights)."""

    topk: int = 5
    scales: list[int] | None = None
    protocol: str = "dense"
    net: int = 0


def parse_ask(fields: dict[str, str], nets: int, known: Sequence[str] = FIELDS) -> Ask:
    """An :class:`Ask` from a request's text fields; a bad field, or one not ``known`` (``/api/look`` shows every
    net: it takes no ``net``), is a :class:`UserError` naming it."""
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise UserError(f"unknown field {unknown[0]!r}; the fields are {', '.join(known)}")

    def number(name: str, default: int, low: int, high: int) -> int:
        text = fields.get(name, "").strip()
        if not text:
            return default
        if not re.fullmatch(r"\d{1,9}", text) or not low <= int(text) <= high:  # not thousands of digits
            shown = text if len(text) <= 20 else f"{text[:20]}..."
            raise UserError(f"{name}: expected an integer from {low} to {high}; got {shown!r}")
        return int(text)

    protocol = fields.get("protocol", "").strip() or "dense"
    if protocol not in PROTOCOLS:
        raise UserError(f"protocol: one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    text = fields.get("scales", "").strip()
    try:
        scales = parse_scales(text) if text else None
    except argparse.ArgumentTypeError as error:
        raise UserError(f"scales: {error}") from None
    return Ask(number("topk", 5, 1, MAX_TOPK), scales, protocol, number("net", 0, 0, nets - 1))


def _checked_size(path: Path, name: str) -> tuple[int, int]:
    """The displayed (w, h) of the image at ``path`` when it has at most :data:`MAX_UPLOAD_PIXELS` and decodes."""
    with open_image(path) as img:
        w, h = img.size  # from the header; reading a PNG's EXIF (for the displayed size) decodes it all
        if w * h > MAX_UPLOAD_PIXELS:
            raise UserError(f"{name}: {w}x{h} pixels, more than the {MAX_UPLOAD_PIXELS / 1e6:g} M pixels an upload "
                            "may have")
        img.load()  # the whole image decodes: a truncated file is refused here
        return displayed_size(img)


def checked_image(path: Path, name: str) -> tuple[int, int]:
    """The displayed (w, h) of an uploaded image that decodes whole and has at most :data:`MAX_UPLOAD_PIXELS`;
    otherwise a :class:`UserError` naming the upload ``name``."""
    if path.stat().st_size == 0:
        raise UserError(f"{name}: an empty file, not an image")
    try:
        size = _checked_size(path, name)  # an image over our limit refused, of any size Pillow opens
    except UserError:
        raise  # a UserError is a ValueError, one of DECODE_ERRORS: its own line, not "unreadable image (...)"
    except Image.DecompressionBombError as error:  # over Pillow's own limit (far above ours) in Image.open
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        count = f"{int(pixels.group(1)) / 1e6:g} M" if pixels else "too many"
        raise UserError(f"{name}: {count} pixels, more than the {MAX_UPLOAD_PIXELS / 1e6:g} M pixels an upload "
                        "may have") from None
    except DECODE_ERRORS as error:
        raise UserError(unreadable(name, error)) from None
    return size


def data_url(image: Any, kind: str = "PNG") -> str:
    """A Pillow image as a ``data:`` URL the page shows without another request."""
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **({"quality": 90} if kind == "JPEG" else {}))
    return f"data:image/{kind.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def preview(path: Path) -> str:
    """The image upright (its EXIF rotation applied, as the nets see it), at most :data:`PREVIEW_SIDE`, as JPEG."""
    with open_image(path) as img:
        shown = decode(img)
        shown.load()  # read before the file closes (an upright RGB file is returned undecoded)
    shown.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    return data_url(shown, "JPEG")


def saliency_png(saliency: Tensor) -> str:
    """A saliency map (H, W) as a grey PNG, from its minimum to its maximum, as ``predict --saliency`` draws it."""

    low, high = float(saliency.min()), float(saliency.max())
    scaled = (saliency - low) / (high - low) if high > low else torch.zeros_like(saliency)
    return data_url(Image.fromarray((scaled * 255).round().to(torch.uint8).numpy(), mode="L"))


def net_facts(net: Net) -> dict[str, Any]:
    """What the page says of a net: its configuration (Table 1), parameters, crop, test scales, classes and
    input convention (channel order, value scale, mean and deviation)."""
    info = net.describe()
    return {"name": info.name, "source": info.checkpoint, "model": info.model, "config": info.config,
            "batch_norm": info.batch_norm, "width": info.width, "crop": info.crop, "train_scale": info.train_scale,
            "scales": info.scales, "parameters": parameter_count(net.model), "classes": net.model.num_classes,
            "preprocess": net.preprocess.to_dict()}


def fusion_orders_or_none(nets: Sequence[Net]) -> tuple[tuple[int, ...] | None, ...] | None:
    """Per net, where the first net's classes sit among its outputs (:func:`~verydeep.eval.classmap.fusion_orders`,
    as ``eval`` fuses, Sec. 4.4), or None when there is no fusion: one net, or nets of different classes (shown
    side by side)."""
    def classes(net: Net) -> list[str]:
        return list(net.recipe.get("classes") or range(net.model.num_classes))

    if len(nets) < 2:
        return None
    if all(classes(net) == classes(nets[0]) for net in nets):  # unnamed classes too
        return (None,) * len(nets)
    try:
        return fusion_orders(nets)
    except UserError:
        return None


def example_images(folder: Path | None) -> list[Path]:
    """Up to :data:`MAX_EXAMPLES` images of ``folder``: the first of each class folder, then the rest, by path."""
    if folder is None or not folder.is_dir():
        return []
    images = [p for p in images_under(folder) if p.suffix.lower() in EXAMPLE_SUFFIXES and p.is_file()]  # not hidden
    firsts = list({p.parent: p for p in reversed(images)}.values())[::-1]
    return (firsts + [p for p in images if p not in firsts])[:MAX_EXAMPLES]


def default_examples(nets: Sequence[Net]) -> Path | None:
    """The validation folder of the data the first net was trained on, when its run recorded one that exists."""
    data = run_data_folder(nets[0].recipe) if nets[0].recipe.get("data") else None  # a relative one as trained
    for split in ("val", "test"):
        if data and (Path(data) / split).is_dir():
            return Path(data) / split
    return None


@dataclass
class Looker:
    """The nets a page looks through, loaded once: classification nets (fused when they share their classes),
    and the localisation nets of protocol 2 ranked by the first net (``boxes``), run one request at a time."""

    nets: list[Net]
    device: torch.device
    dtype: torch.dtype | None
    boxes: Any = None  # verydeep.eval.localize.dense_nets.DenseNets, with a localisation run
    localizers: list[str] = field(default_factory=list)
    examples: list[Path] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.fusion = fusion_orders_or_none(self.nets)

    def fused(self, posteriors: Sequence[Tensor]) -> Tensor:
        """The nets' posteriors of one image averaged, each in the first net's class order (Sec. 4.4)."""
        assert self.fusion is not None
        return average([p if order is None else p[list(order)] for p, order in zip(posteriors, self.fusion,
                                                                                     strict=True)])

    def info(self) -> dict[str, Any]:
        """The nets, the localisation runs, what a request may ask and the examples, for the page."""
        loc = [{"source": source, "task": recipe.get("task"), "crop": recipe.get("crop"), "scale": recipe.get("scale")}
               for source, recipe in zip(self.localizers, self.boxes.recipes if self.boxes else [], strict=True)]
        return {"nets": [net_facts(net) for net in self.nets], "fusion": self.fusion is not None,
                "localizers": loc, "protocols": list(PROTOCOLS), "device": str(self.device),
                "precision": str(self.dtype or torch.float32).removeprefix("torch."),
                "limits": {"bytes": MAX_UPLOAD_BYTES, "pixels": MAX_UPLOAD_PIXELS, "topk": MAX_TOPK},
                "examples": [path.name for path in self.examples]}

    def classify(self, net: Net, path: Path, name: str, ask: Ask) -> tuple[Prediction, Tensor]:
        """``verydeep predict``'s result for one image (named ``name``) by one net, and its posterior."""
        scales = chosen_scales(net, ask.scales, option="scales:")
        posterior = image_posteriors(net, [path], True, self.device, self.dtype, ask.protocol, scales)[0]
        top = ranked_classes(net, posterior, ask.topk)
        return Prediction(net.checkpoint, scales, True, net.preprocess.to_dict(), [ImagePrediction(name, top)],
                          ask.protocol), posterior

    def predict(self, path: Path, name: str, ask: Ask) -> dict[str, Any]:
        """``POST /api/predict``: the object ``verydeep predict --json`` prints, for net ``ask.net``."""
        with self.lock:  # one image decoded at a time too: a decoded upload may take 200 MB
            checked_image(path, name)
            return self.classify(self.nets[ask.net], path, name, ask)[0].to_dict()

    def look(self, path: Path, name: str, ask: Ask) -> dict[str, Any]:
        """``POST /api/look``, what the page shows: each net's classes, time and saliency map, their fusion,
        the boxes, the preview they are drawn over, and the time taken."""
        start = time.perf_counter()
        with self.lock:  # one image decoded at a time too: a decoded upload may take 200 MB
            size = checked_image(path, name)
            nets, posteriors = [], []
            for net in self.nets:
                began = time.perf_counter()
                prediction, posterior = self.classify(net, path, name, ask)
                best = prediction.predictions[0].top[0]
                saliency = saliency_map(net, load_image(path, min(prediction.scales)), best.index, self.device)
                posteriors.append(posterior)
                nets.append({"name": net.name, "prediction": prediction.to_dict(), "saliency": saliency_png(saliency),
                             "seconds": time.perf_counter() - began})
            fused = None
            if self.fusion is not None:
                ranked = ranked_classes(self.nets[0], self.fused(posteriors), ask.topk)
                fused = [to_json_dict(entry) for entry in ranked]
            boxes = self.guesses(path, ask) if self.boxes is not None else None
        return {"image": name, "size": list(size), "preview": preview(path), "nets": nets, "fusion": fused,
                "boxes": boxes, "protocol": ask.protocol, "seconds": time.perf_counter() - start}

    def guesses(self, path: Path, ask: Ask) -> dict[str, Any]:
        """Protocol 2's top (class, box) guesses, as ``localize predict`` prints them, or the reason there are none."""

        began = time.perf_counter()
        recipe = self.boxes.recipes[0]
        names = self.boxes.class_names
        scales = ask.scales or [smallest_training_scale(recipe)]
        try:
            self.boxes.check_scales(scales, option="scales:")
        except UserError as error:
            return {"error": str(error), "scales": scales}
        found = self.boxes.guesses(path, scales, ask.topk, workers=0)  # one upload, read in the request's thread
        return {"scales": scales, "seconds": time.perf_counter() - began, "predictions": [
            {"class": names[g.label], "box": [round(v, 1) for v in g.box.tolist()], "score": g.score} for g in found]}


def load_looker(sources: Sequence[str], localizers: Sequence[str] | None, device: str, precision: str,
                weights_dir: str | None = None, examples: Path | None = None) -> Looker:
    """The nets of ``sources`` (through :func:`verydeep.eval.nets.load_nets`, as ``predict`` loads them; fp32
    weights, since a saliency map takes its gradient in fp32) and the localisation runs ``localizers``, ranked
    by the first net (``localize predict --classifier``), whose weights they share."""

    torch_device = pick_device(device)
    dtype = autocast_dtype(torch_device, precision)
    nets = load_nets(list(sources), None, None, torch_device, weights_dir)
    boxes = None
    if localizers:

        boxes = DenseNets.load(list(localizers), resolve_source(sources[0], weights_dir), device,
                               options=("--localizer", "--weights"))  # the first classifies, as for the page
        boxes.classify = nets[0].dense  # the same weights as the first net: held once
    if examples is not None and not examples.is_dir():
        raise UserError(f"--examples {examples}: not a folder")
    chosen = example_images(examples or default_examples(nets))
    if examples is not None and not chosen:
        raise UserError(f"--examples {examples}: no images in it (JPEG, PNG, ...) to offer")
    return Looker(nets, torch_device, dtype, boxes, list(localizers or []), chosen)


# ---- the web page and its API --------------------------------------------------------------------

#: The page loads its own files and ``data:`` images alone: nothing from the network.
CONTENT_SECURITY_POLICY = (b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
                           b"connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
#: Room for the multipart form around the image, in bytes.
FORM_SLACK = 64 * 1024
APP_MODULES = {"starlette": "starlette", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}


def require_app() -> None:
    """A one-line :class:`UserError` when the ``app`` extra is not installed."""
    missing = [package for module, package in APP_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"verydeep serve needs {', '.join(missing)}: pip install 'verydeep[app]'")


class SecurityHeaders:
    """ASGI middleware: every response carries :data:`CONTENT_SECURITY_POLICY`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-content-type-options", b"nosniff"),
                                      (b"content-security-policy", CONTENT_SECURITY_POLICY)]
            await send(message)

        await self.app(scope, receive, sending)


def limited(receive: Any, limit: int) -> Any:
    """An ASGI ``receive`` that refuses a request body longer than ``limit`` bytes (one sent without a length)."""
    seen = 0

    async def receiving() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise UserError(f"the upload is over {MAX_UPLOAD_BYTES / 2**20:g} MB, the most an image may have")
        return message

    return receiving


async def read_upload(request: Any, folder: Path) -> tuple[Path, str, dict[str, str]]:
    """The uploaded image saved in ``folder``, its name as given (without folders), and the form's text fields;
    a missing, oversized or malformed upload is a :class:`UserError`."""
    from python_multipart.exceptions import MultipartParseError
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request

    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_UPLOAD_BYTES + FORM_SLACK:
        raise UserError(f"the upload is {int(length) / 2**20:.1f} MB; an image may have at most "
                        f"{MAX_UPLOAD_BYTES / 2**20:g} MB")
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):  # case-blind (RFC 9110)
        raise UserError("send a multipart/form-data request with the image in the field 'image'")
    if request.query_params:  # a script's params={"topk": 1} would be dropped: the form alone is read
        raise UserError(f"the URL's query ({request.url.query[:80]}) is not read: the request is the form's fields "
                        "alone")
    bounded = Request(request.scope, limited(request.receive, MAX_UPLOAD_BYTES + FORM_SLACK))
    try:
        form = await bounded.form(max_files=1, max_fields=len(FIELDS), max_part_size=FORM_SLACK)
    except (MultiPartException, MultipartParseError) as error:
        raise UserError(f"a malformed multipart form ({error})") from None
    except HTTPException as error:  # Starlette turns a MultiPartException into a 400 HTTPException itself
        raise UserError(f"a malformed multipart form ({error.detail})") from None
    image = form.get("image")
    if image is None or isinstance(image, str):
        raise UserError("give the image as a file in the multipart field 'image'")
    name = Path(image.filename or "upload").name or "upload"
    suffix = Path(name).suffix if IMAGE_SUFFIX.fullmatch(Path(name).suffix) else ""
    path = folder / f"upload{suffix}"
    with path.open("wb") as out:
        shutil.copyfileobj(image.file, out)
    await form.close()
    if path.stat().st_size > MAX_UPLOAD_BYTES:  # the form's room around the image is not the image's
        raise UserError(f"{name}: the image is {path.stat().st_size / 2**20:.2f} MB; an image may have at most "
                        f"{MAX_UPLOAD_BYTES / 2**20:g} MB")
    given = [(key, value) for key, value in form.multi_items() if isinstance(value, str)]
    twice = next((key for i, (key, _) in enumerate(given) if key in dict(given[:i])), None)
    if twice is not None:
        raise UserError(f"the field {twice!r} is given twice; give it once")
    return path, name, dict(given)


async def http_error(request: Any, error: Any) -> Any:
    """Starlette's own errors (a form it could not parse, an unknown route, a wrong method): under ``/api/``
    the API's ``{"error": ONE LINE}`` with the same status, elsewhere Starlette's plain text."""
    from starlette.responses import JSONResponse, PlainTextResponse, Response

    if error.status_code in (204, 304):
        return Response(status_code=error.status_code, headers=error.headers)
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": one_line(str(error.detail))}, status_code=error.status_code,
                            headers=error.headers)
    return PlainTextResponse(error.detail, status_code=error.status_code, headers=error.headers)


def build_app(looker: Looker) -> Any:
    """The Starlette application: the page (``/``, ``/static``), ``GET /api/info``, ``POST /api/predict``,
    ``POST /api/look`` and ``GET /api/examples/N``."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import ClientDisconnect
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    static = Path(__file__).with_name("static")

    async def answer(request: Any, work: Any, known: Sequence[str] = FIELDS) -> Any:
        path: Path | None = None
        with tempfile.TemporaryDirectory(prefix="verydeep-serve-") as folder:
            try:
                path, name, fields = await read_upload(request, Path(folder))
                result = await run_in_threadpool(work, path, name, parse_ask(fields, len(looker.nets), known))
            except UserError as error:
                message = str(error) if path is None else str(error).replace(str(path), name)
                return JSONResponse({"error": one_line(message)}, status_code=400)
            except ClientDisconnect:  # a tab closed or reloaded during the upload: no one to answer, nothing wrong
                return Response(status_code=400)
            except Exception as error:  # a bug: the API still answers in its JSON, the traceback goes to the log
                log.exception("%s failed", request.url.path)
                return JSONResponse({"error": one_line(f"internal error ({type(error).__name__}: {error})")},
                                    status_code=500)
        return JSONResponse(result)

    async def example(request: Any) -> Any:
        index = request.path_params["index"]
        if not 0 <= index < len(looker.examples):
            return JSONResponse({"error": f"no example {index}; there are {len(looker.examples)}"}, status_code=404)
        if not looker.examples[index].is_file():
            return JSONResponse({"error": f"example {index} ({looker.examples[index]}) is gone"}, status_code=404)
        return FileResponse(looker.examples[index])

    async def predict(request: Any) -> Any:
        return await answer(request, looker.predict)

    async def look(request: Any) -> Any:
        return await answer(request, looker.look, LOOK_FIELDS)

    routes = [
        Route("/", lambda request: FileResponse(static / "index.html")),
        Route("/api/info", lambda request: JSONResponse(looker.info())),
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/look", look, methods=["POST"]),
        Route("/api/examples/{index:int}", example),
        Mount("/static", StaticFiles(directory=static)),
    ]
    return Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)],
                     exception_handlers={HTTPException: http_error})


def listening(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port``; a port in use or a bad host is a :class:`UserError` naming the option.
    An empty host, which the system takes for every address (an unset ``--host "$HOST"``), is one too."""
    if not host.strip():
        raise UserError(f"--host {host!r}: give an address (127.0.0.1 for this machine, 0.0.0.0 for every network)")
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except (OSError, OverflowError) as error:
        reason = getattr(error, "strerror", None) or error
        raise UserError(f"--host {host} --port {port}: cannot listen there ({reason})") from None


def server(looker: Looker, sock: socket.socket) -> Any:
    """A uvicorn server of :func:`build_app` on the listening ``sock``: ``.run(sockets=[sock])`` serves."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(build_app(looker), host=host, port=port, log_level="warning", access_log=False)
    return uvicorn.Server(config)


def port_number(text: str) -> int:
    """``type=`` for ``--port``: a TCP port from 1 to 65535."""
    port = positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port from 1 to 65535; got {text!r}")
    return int(port)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="a local web page to look at nets: top classes, fusion, saliency "
                                            "maps, boxes (Sec. 3.2, 4.4, Appendix A)")
    add_weights(p, repeat="compare nets side by side and see their fusion (Table 6)")
    p.add_argument("--localizer", action="append", metavar="RUN",
                   help="a localisation run (verydeep localize train): its boxes, ranked by the first --weights as "
                        "localize predict --classifier does (protocol 2, Appendix A); repeat to pool several nets' "
                        "boxes")
    p.add_argument("--examples", type=Path, default=None, metavar="DIR",
                   help=f"offer up to {MAX_EXAMPLES} images of this folder as examples (default: the validation "
                        "images of the data the first net's run was trained on, when it is there)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine)")
    p.add_argument("--port", type=port_number, default=7860, help="the port to listen on (default 7860)")
    add_device(p)
    add_precision(p)
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    require_app()
    sources = given_weights(args)
    sock = listening(args.host, args.port)  # a port in use is refused before the nets load
    looker = load_looker(sources, args.localizer, args.device, args.precision, args.weights_dir, args.examples)
    host = f"[{args.host}]" if ":" in args.host else args.host
    names = ", ".join(net.name for net in looker.nets)
    print(f"verydeep serve: {names} on {looker.device}; open http://{host}:{args.port}/ (Ctrl-C stops)", flush=True)
    server(looker, sock).run(sockets=[sock])
