"""verydeep serve without a browser: ``POST /api/predict`` is ``verydeep predict --json``; the page's
``/api/look`` fuses, draws the saliency map and the boxes as predict and localize predict do; a bad
upload is HTTP 400 with one line; a real server stays up, its memory bounded, through many requests."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, photo, save, serving, write_classifier, write_localiser
from PIL import Image

pytest.importorskip("starlette", reason="verydeep serve needs the app extra: pip install 'verydeep[app]'")
httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is httpx (the dev extra)")

from verydeep import serve  # noqa: E402
from verydeep.cli import main  # noqa: E402
from verydeep.eval.localize.dense_nets import DenseNets  # noqa: E402
from verydeep.eval.nets import load_nets  # noqa: E402
from verydeep.eval.predict import load_image, saliency_map  # noqa: E402
from verydeep.io.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from verydeep.serve import MAX_UPLOAD_BYTES, Ask, load_looker  # noqa: E402

SAMPLES = SHARED / "imagenet-samples"
#: How much the server's resident memory may grow between the 40th and the 200th request.
RSS_GROWTH_BOUND_MB = 32


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two classifiers of the same ten classes and a localisation net of those classes."""
    folder = tmp_path_factory.mktemp("nets")
    a, b = write_classifier(folder / "a.pt", seed=0), write_classifier(folder / "b.pt", seed=1)
    return a, b, write_localiser(folder / "loc.pt", a)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real photo when ../shared/data has them, else a photo-like JPEG."""
    found = sorted(SAMPLES.glob("*.JPEG"))
    return found[0] if found else save(photo(160, 120), tmp_path_factory.mktemp("photo") / "photo.jpg", quality=90)


@pytest.fixture(scope="module")
def client(nets: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A client of the page's server: both classifiers, the localisation net, two examples."""
    a, b, loc = nets
    examples = tmp_path_factory.mktemp("examples")
    for name in ("cat", "dog"):
        save(photo(64, 48, seed=len(name)), examples / name / f"{name}.png")
    looker = load_looker([str(a), str(b)], [str(loc)], "cpu", "auto", examples=examples)
    with serving(looker) as url, httpx.Client(base_url=url, timeout=120) as http:
        yield http


def cli_json(capsys: pytest.CaptureFixture, *args: str) -> dict:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def post(client: httpx.Client, path: Path, url: str = "/api/predict", name: str | None = None, **fields: str):
    return client.post(url, files={"image": (name or path.name, path.read_bytes())}, data=fields)


def same_prediction(served: dict, printed: dict, image: Path) -> None:
    """The server's object is predict's, the image named as uploaded; probabilities within 1e-6."""
    assert served["predictions"][0]["image"] == image.name
    served["predictions"][0]["image"] = printed["predictions"][0]["image"]
    ours = [t.pop("probability") for t in served["predictions"][0]["top"]]
    theirs = [t.pop("probability") for t in printed["predictions"][0]["top"]]
    assert served == printed
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_nets_of_the_same_classes_in_another_order_are_fused_in_the_first_net_s_order(nets, image, tmp_path):
    a, b, _ = nets
    state = load_checkpoint(b)
    order = list(reversed(range(10)))  # the second net, its classes listed the other way round
    recipe = {**state["recipe"], "classes": [state["recipe"]["classes"][i] for i in order],
              "class_names": [state["recipe"]["class_names"][i] for i in order]}
    model = {**state["model"], **{f"classifier.6.{kind}": state["model"][f"classifier.6.{kind}"][order]
                                  for kind in ("weight", "bias")}}
    reordered = tmp_path / "reordered.pt"
    save_checkpoint({"model": model, "recipe": recipe}, reordered)
    looks = [load_looker([str(a), str(second)], None, "cpu", "fp32").look(image, image.name, Ask(topk=5))
             for second in (b, reordered)]
    as_given, turned = (look["fusion"] for look in looks)
    assert [t["index"] for t in turned] == [t["index"] for t in as_given]
    np.testing.assert_allclose([t["probability"] for t in turned], [t["probability"] for t in as_given], atol=1e-6)
    tops = [look["nets"][1]["prediction"]["predictions"][0]["top"][0]["index"] for look in looks]
    assert tops[1] == 9 - tops[0]  # the second net's own outputs, in its own order
    with pytest.raises(serve.UserError, match="the weights of --weights .* again"):  # the first net reordered: itself
        load_looker([str(b), str(reordered)], None, "cpu", "fp32")


@pytest.mark.parametrize("fields", [{}, {"topk": "3", "net": "1"}, {"protocol": "dense+multicrop", "scales": "40,48"}])
def test_api_predict_is_predict_json(client, nets, image, capsys, fields):
    source = str(nets[int(fields.get("net", 0))])
    flags = [arg for key, value in fields.items() if key != "net" for arg in (f"--{key}", value)]
    printed = cli_json(capsys, "predict", "--weights", source, str(image), "--json", "--device", "cpu", *flags)
    response = post(client, image, **fields)
    assert response.status_code == 200, response.text
    same_prediction(response.json(), printed, image)


def decode_png(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def test_the_page_fuses_the_nets_and_draws_saliency_and_boxes(client, nets, image, capsys, tmp_path):
    a, b, loc = nets
    response = post(client, image, "/api/look")
    assert response.status_code == 200, response.text
    look = response.json()
    full = [cli_json(capsys, "predict", "--weights", str(net), str(image), "--json", "--topk", "10")
            for net in (a, b)]
    posteriors = np.zeros((2, 10))
    for row, printed in zip(posteriors, full, strict=True):
        for entry in printed["predictions"][0]["top"]:
            row[entry["index"]] = entry["probability"]
    fused = posteriors.mean(axis=0)  # Sec. 4.4: the nets' posteriors averaged
    assert [t["index"] for t in look["fusion"]] == list(np.argsort(-fused)[:5])
    np.testing.assert_allclose([t["probability"] for t in look["fusion"]], np.sort(fused)[::-1][:5], atol=1e-6)
    for served, printed in zip(look["nets"], full, strict=True):
        assert served["prediction"]["predictions"][0]["top"][0] == printed["predictions"][0]["top"][0]
    # the saliency map: predict --saliency's computation, on the image at the smallest Q, scaled to 0..255
    net = load_nets([a], None, None, torch.device("cpu"))[0]
    picture = load_image(image, 32)
    expected = saliency_map(net, picture, full[0]["predictions"][0]["top"][0]["index"], torch.device("cpu"))
    expected = ((expected - expected.min()) / (expected.max() - expected.min()) * 255).numpy()
    shown = decode_png(look["nets"][0]["saliency"])
    assert shown.shape == tuple(picture.shape[1:]) and np.abs(shown - expected).max() <= 1
    # the boxes: localize predict's, protocol 2 at the localisation net's S
    main(["localize", "predict", str(image), "--checkpoint", str(loc), "--classifier", str(a), "--out",
          str(tmp_path / "drawn")])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    boxes = look["boxes"]["predictions"]
    assert [(g["class"], g["box"]) for g in boxes] == [(g["class"], g["box"]) for g in printed["predictions"]]
    np.testing.assert_allclose([g["score"] for g in boxes], [g["score"] for g in printed["predictions"]], atol=1e-6)
    assert look["boxes"]["scales"] == [32] and len(look["boxes"]["predictions"]) == 5
    assert look["size"] == list(Image.open(image).size) and look["seconds"] > 0


def huge_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (its data holds one)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # IHDR: width, height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def bad_uploads(image: Path) -> list[tuple[dict, dict, str]]:
    """(files, fields, what the one-line error says) of bad requests."""
    whole = image.read_bytes()
    buffer = io.BytesIO()
    Image.new("RGB", (20, 2000)).save(buffer, format="PNG")  # at Q = 2048 a strip of 2048 x 204800 pixels
    strip = buffer.getvalue()
    return [
        ({"image": ("notes.txt", b"not an image at all")}, {}, "notes.txt: unreadable image"),
        ({"image": ("empty.jpg", b"")}, {}, "empty.jpg: an empty file"),
        ({"image": ("cut.jpg", whole[: len(whole) // 3])}, {}, "cut.jpg: unreadable image"),
        ({"image": ("vast.png", huge_png(10000, 8000))}, {}, "vast.png: 10000x8000 pixels, more than"),
        ({"image": ("big.jpg", b"\xff" * (MAX_UPLOAD_BYTES + 2**17))}, {}, "an image may have at most 32 MB"),
        ({"image": ("over.jpg", b"\xff" * (MAX_UPLOAD_BYTES + 2**10))}, {}, "over.jpg: the image is 32.00 MB; an "
                                                                        "image may have at most 32 MB"),
        ({"photo": ("x.jpg", whole)}, {}, "the multipart field 'image'"),
        ({"image": ("x.jpg", whole)}, {"colour": "red"}, "unknown field 'colour'"),
        ({"image": ("x.jpg", whole)}, {"topk": "0"}, "topk: expected an integer from 1 to 100; got '0'"),
        ({"image": ("x.jpg", whole)}, {"topk": "1" * 5000}, "topk: expected an integer from 1 to 100; got '"
                                                           "11111111111111111111...'"),  # too long for int()
        ({"image": ("x.jpg", whole)}, {"scales": "abc"}, "scales: expected comma-separated integers"),
        ({"image": ("x.jpg", whole)}, {"scales": "16"}, "scales: [16] smaller than the crop 32"),
        ({"image": ("strip.png", strip)}, {"scales": "2048"}, "strip.png: rescaled to Q = 2048 it would be 2048 x"),
        ({"image": ("x.jpg", whole)}, {"protocol": "centre"}, "protocol: one of dense, multicrop, dense+multicrop"),
        ({"image": ("x.jpg", whole)}, {"topk": ["1", "2"]}, "the field 'topk' is given twice"),
        # the UserError's own line, not "unreadable image (UserError: ...)"; over Pillow's limit too
        ({"image": ("huge.png", huge_png(10000, 10000))}, {}, "huge.png: 10000x10000 pixels, more than the 50 M"),
        ({"image": ("bomb.png", huge_png(20000, 20000))}, {}, "bomb.png: 400 M pixels, more than the 50 M"),
        # what Starlette's form parser refuses (it raises an HTTPException of its own)
        ([("image", ("x.jpg", whole)), ("image", ("y.jpg", whole))], {}, "Too many files"),
        ({"image": ("x.jpg", whole)}, {f"f{i}": "1" for i in range(6)}, "Too many fields"),
        ({"image": ("x.jpg", whole)}, {"topk": "1" * 2 * 2**20}, "Part exceeded maximum size"),
    ]


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")  # huge.png: refused without Pillow's warning
def test_a_bad_upload_is_http_400_with_one_line_and_the_server_carries_on(client, image):
    for files, fields, reason in bad_uploads(image):
        for url in ("/api/predict", "/api/look"):
            response = client.post(url, files=files, data=fields)
            assert response.status_code == 400, (url, reason, response.text)
            error = response.json()["error"]
            assert reason in error and "\n" not in error and "verydeep-serve-" not in error, (reason, error)
            assert "unreadable" not in error or "unreadable" in reason, error
    whole = image.read_bytes()
    wrong_net = client.post("/api/predict", files={"image": ("x.jpg", whole)}, data={"net": "2"})
    assert wrong_net.status_code == 400 and "net: expected an integer from 0 to 1; got '2'" in wrong_net.json()["error"]
    every_net = client.post("/api/look", files={"image": ("x.jpg", whole)}, data={"net": "0"})  # it shows them all
    assert every_net.status_code == 400 and every_net.json()["error"].startswith("unknown field 'net'")
    garbage = {"content-type": "multipart/form-data; boundary=xx"}
    for body in (b"garbage", b"--xx\r\nno headers end here"):
        response = client.post("/api/look", content=body, headers=garbage)
        assert response.status_code == 400 and response.headers["content-type"] == "application/json", response.text
        assert response.json()["error"].startswith("a malformed multipart form"), response.text
    form = {"content-type": "application/x-www-form-urlencoded"}
    response = client.post("/api/predict", content=b"image=1", headers=form)
    assert response.status_code == 400 and "multipart/form-data" in response.json()["error"]
    queried = client.post("/api/predict?topk=1", files={"image": ("x.jpg", whole)})  # requests' params={"topk": 1}
    assert queried.status_code == 400 and queried.json()["error"] == ("the URL's query (topk=1) is not read: the "
                                                                      "request is the form's fields alone")
    upper = client.post("/api/predict", content=b"--xx\r\nno headers end here",
                        headers={"content-type": "Multipart/Form-Data; boundary=xx"})  # media types are case-blind
    assert upper.json()["error"].startswith("a malformed multipart form"), upper.text
    assert post(client, image).status_code == 200


def test_uploads_are_decoded_one_at_a_time_as_the_nets_run(nets, image, monkeypatch):
    looker = load_looker([str(nets[0])], [], "cpu", "auto")
    decoded_holding_the_lock, checked_image = [], serve.checked_image

    def watched(path: Path, name: str) -> tuple[int, int]:
        decoded_holding_the_lock.append(looker.lock.locked())  # else 40 threads could each hold a 200 MB image
        return checked_image(path, name)

    monkeypatch.setattr(serve, "checked_image", watched)
    looker.predict(image, "x.png", Ask(topk=1))
    looker.look(image, "x.png", Ask(topk=1))
    assert decoded_holding_the_lock == [True, True]


def test_the_page_describes_the_nets_offers_examples_and_fetches_nothing_elsewhere(client, nets):
    info = client.get("/api/info").json()
    net = load_nets([nets[0]], None, None, torch.device("cpu"))[0]
    first = info["nets"][0]
    assert first["parameters"] == sum(p.numel() for p in net.model.parameters()) and first["model"] == "A"
    assert first["preprocess"]["channels"] == "RGB" and first["scales"] == [32, 36, 41] and first["crop"] == 32
    assert info["fusion"] and info["localizers"][0]["task"] == "localisation-pcr"
    assert info["examples"] == ["cat.png", "dog.png"]  # one per class folder
    assert client.get("/api/examples/1").content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get("/api/examples/2").status_code == 404
    # Starlette's own errors under /api/ are the API's JSON, with their status; elsewhere plain text
    for method, url, status in (("GET", "/api/nothing", 404), ("GET", "/api/look", 405), ("GET", "/nothing", 404)):
        response = client.request(method, url)
        assert response.status_code == status, (url, response.text)
        if url.startswith("/api/"):
            assert response.json() == {"error": "Not Found" if status == 404 else "Method Not Allowed"}
        else:
            assert response.text == "Not Found"
    page = client.get("/")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy  # the browser loads nothing else
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200


def test_the_command_refuses_a_busy_port_a_bad_port_and_no_weights(nets, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--weights", str(nets[0]), "--port", str(port)]) == 2
        assert capsys.readouterr().err.startswith(f"verydeep serve: error: --host 127.0.0.1 --port {port}: cannot "
                                                  "listen there")
    with pytest.raises(SystemExit):
        main(["serve", "--weights", str(nets[0]), "--port", "70000"])
    assert "expected a TCP port from 1 to 65535" in capsys.readouterr().err
    assert main(["serve", "--port", str(port)]) == 2
    assert "give --weights" in capsys.readouterr().err
    assert main(["serve", "--weights", str(nets[0]), "--host", "", "--port", str(port)]) == 2  # "$HOST" unset
    assert "--host '': give an address (127.0.0.1 for this machine" in capsys.readouterr().err



def test_an_example_gone_since_the_start_is_http_404_in_json(nets, tmp_path):
    for name in ("cat", "dog"):
        save(photo(64, 48), tmp_path / "examples" / name / f"{name}.png")
    looker = load_looker([str(nets[0])], None, "cpu", "auto", examples=tmp_path / "examples")
    (tmp_path / "examples" / "cat" / "cat.png").unlink()
    with serving(looker) as url, httpx.Client(base_url=url, timeout=60) as http:
        response = http.get("/api/examples/0")
        assert response.status_code == 404 and response.json()["error"].startswith("example 0 (")
        assert http.get("/api/examples/1").status_code == 200


def test_the_localisation_nets_are_named_by_serve_s_own_options(nets):
    a, _, loc = nets
    with pytest.raises(serve.UserError, match=f"^--localizer {loc}: the weights of --localizer {loc} again"):
        load_looker([str(a)], [str(loc), str(loc)], "cpu", "auto")
    with pytest.raises(serve.UserError, match=f"^--weights {loc}: not a classification net"):
        DenseNets.load([loc], loc, "cpu", options=("--localizer", "--weights"))


def test_the_default_examples_are_found_from_another_folder_than_the_run_was_trained_in(tmp_path, monkeypatch):
    save(photo(64, 48), tmp_path / "ds" / "val" / "cat" / "0.png")
    trained = type("Net", (), {"recipe": {"data": "ds", "data_resolved": str(tmp_path / "ds")}})
    monkeypatch.chdir(tmp_path / "ds" / "val")  # where no ds/ lies
    assert serve.default_examples([trained]) == tmp_path / "ds" / "val"


def test_examples_from_a_folder_without_images_are_refused(nets, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(serve.UserError, match=f"--examples {tmp_path / 'empty'}: no images in it"):
        load_looker([str(nets[0])], None, "cpu", "auto", examples=tmp_path / "empty")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float:
    """The resident memory of process ``pid`` in MB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the server's memory from /proc (Linux)")
def test_a_real_server_stays_up_through_200_requests_a_quarter_bad_and_its_memory_stays_bounded(nets, image, tmp_path):
    port, small = free_port(), save(photo(160, 120, seed=5), tmp_path / "small.jpg", quality=90)
    command = [sys.executable, "-m", "verydeep.cli", "serve", "--weights", str(nets[0]), "--localizer", str(nets[2]),
               "--port", str(port), "--device", "cpu"]
    log = (tmp_path / "stderr.txt").open("w")
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert f"open http://127.0.0.1:{port}/" in server.stdout.readline(), (tmp_path / "stderr.txt").read_text()
        bad = bad_uploads(image)[:5]  # not an image, empty, truncated, too many pixels, too many bytes
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            for _ in range(50):
                if http.get("/api/info").status_code == 200:
                    break
                time.sleep(0.1)
            statuses, memory = [], {}
            for i in range(200):
                if i % 4 == 3:
                    files, fields, _ = bad[(i // 4) % len(bad)]
                    statuses.append((400, http.post("/api/predict", files=files, data=fields).status_code))
                else:
                    url = "/api/look" if i % 2 else "/api/predict"
                    sent = http.post(url, files={"image": (small.name, small.read_bytes())})
                    statuses.append((200, sent.status_code))
                if i + 1 in (40, 200):
                    memory[i + 1] = rss_mb(server.pid)
        assert server.poll() is None and all(want == got for want, got in statuses), statuses
        assert sum(want == 400 for want, _ in statuses) == 50
        growth = memory[200] - memory[40]
        print(f"server RSS {memory[40]:.0f} MB after 40 requests, {memory[200]:.0f} MB after 200 ({growth:+.1f} MB)")
        assert growth < RSS_GROWTH_BOUND_MB, memory
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_an_upload_the_client_gives_up_midway_leaves_no_traceback_and_the_server_carries_on(nets, image, caplog):
    """A tab closed or reloaded during an upload: an ordinary event, not an internal error with a traceback."""
    looker = load_looker([str(nets[0])], [], "cpu", "auto")
    head = ("POST {} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XX\r\nContent-Length: "
            "1000000\r\n\r\n--XX\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n")
    with serving(looker) as url, httpx.Client(base_url=url, timeout=60) as http:
        port = int(url.rsplit(":", 1)[1])
        for path in ("/api/predict", "/api/look"):
            with socket.create_connection(("127.0.0.1", port)) as gone:
                gone.sendall(head.format(path).encode() + image.read_bytes()[:1000])
            time.sleep(0.5)  # the server reads on, finds the client gone
        assert post(http, image).status_code == 200
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text


def test_a_bug_under_the_api_is_http_500_with_one_json_line(nets, image, monkeypatch):
    looker = load_looker([str(nets[0])], [], "cpu", "auto")

    def broken(*args: object) -> dict:
        raise RuntimeError("a bug\nover two lines")

    monkeypatch.setattr(looker, "predict", broken)
    with serving(looker) as url, httpx.Client(base_url=url, timeout=60) as http:
        response = post(http, image)
        assert response.status_code == 500 and response.headers["content-type"] == "application/json"
        assert response.json() == {"error": "internal error (RuntimeError: a bug over two lines)"}
        assert http.get("/api/info").status_code == 200  # and it carries on
