"""verydeep serve's page in a real browser (Debian's headless Chromium, driven by Selenium): a real photo
uploaded shows predict's top-5 names and probabilities, the saliency map and localize predict's boxes; a
corrupt upload shows a message and the page answers the next upload; the page loads nothing from elsewhere."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SHARED, serving, write_classifier, write_localiser

pytest.importorskip("starlette", reason="verydeep serve needs the app extra: pip install 'verydeep[app]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra)")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from verydeep.cli import main  # noqa: E402
from verydeep.eval.predict import load_image  # noqa: E402
from verydeep.options import one_line  # noqa: E402
from verydeep.serve import load_looker  # noqa: E402

#: Processes, servers or whole training runs: minutes on two cores (`pytest -m 'not slow'` leaves them out).
pytestmark = pytest.mark.slow

SAMPLES = SHARED / "imagenet-samples"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Chromium with its driver; the test skips, saying why, where there is none."""
    binary = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    try:
        chrome = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    except WebDriverException as error:
        pytest.skip(f"chromium did not start: {one_line(error.msg)}")
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def photo() -> Path:
    found = sorted(SAMPLES.glob("*.JPEG"))
    if not found:
        pytest.skip(f"real photos not found at {SAMPLES} (../shared/data beside the repo)")
    return found[0].resolve()  # the browser takes canonical paths only


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("nets")
    classifier = write_classifier(folder / "net.pt")
    return classifier, write_localiser(folder / "loc.pt", classifier)


@pytest.fixture(scope="module")
def page(nets: tuple[Path, Path]) -> Iterator[str]:
    with serving(load_looker([str(nets[0])], [str(nets[1])], "cpu", "auto")) as url:
        yield url


def cli_json(capsys: pytest.CaptureFixture, *args: str) -> dict:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def upload(browser, path: Path, looks: int) -> str:
    """Choose ``path`` in the page's file input and wait for the page's ``looks``-th answer; the page's state."""
    browser.find_element(By.ID, "image-input").send_keys(str(path))
    body = browser.find_element(By.TAG_NAME, "body")
    WebDriverWait(browser, 60).until(lambda _: body.get_attribute("data-looks") == str(looks))
    return body.get_attribute("data-state")


def shown_classes(browser) -> list[tuple[str, float]]:
    """The first net's top classes as the page shows them: names and probabilities (from "12.34%")."""
    rows = browser.find_elements(By.CSS_SELECTOR, "[data-net='0'] table.top tr")
    return [(row.find_element(By.CSS_SELECTOR, "td.name").text,
             float(row.find_element(By.CSS_SELECTOR, "td.prob").text.rstrip("%")) / 100) for row in rows]


def test_the_page_shows_predict_saliency_and_boxes_and_survives_a_corrupt_upload(browser, page, photo, nets,
                                                                                  capsys, tmp_path):
    net, loc = nets
    printed = cli_json(capsys, "predict", "--weights", str(net), str(photo), "--json")["predictions"][0]["top"]
    main(["localize", "predict", str(photo), "--checkpoint", str(loc), "--classifier", str(net), "--out",
          str(tmp_path / "drawn")])
    boxes = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["predictions"]
    browser.get(page)
    body = browser.find_element(By.TAG_NAME, "body")
    WebDriverWait(browser, 30).until(lambda _: body.get_attribute("data-state") == "ready")
    assert "A S=36" in browser.find_element(By.ID, "nets").text  # the net's configuration, described

    def check_result() -> None:
        shown = shown_classes(browser)
        assert [name for name, _ in shown] == [entry["name"] for entry in printed]
        for (_, probability), entry in zip(shown, printed, strict=True):
            assert abs(probability - entry["probability"]) <= 1e-4
        saliency = browser.find_element(By.ID, "saliency-0")
        width = browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", saliency)
        assert saliency.is_displayed() and width == load_image(photo, 32).shape[-1]  # the photo at Q = 32
        assert len(browser.find_elements(By.CSS_SELECTOR, "#boxes-overlay rect")) == len(boxes) == 5
        listed = browser.find_elements(By.CSS_SELECTOR, "#boxes table td.name")
        assert [cell.text for cell in listed] == [guess["class"] for guess in boxes]
        assert not browser.find_element(By.ID, "message").is_displayed()

    assert upload(browser, photo, 1) == "done"
    check_result()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photo.read_bytes()[:4000])
    assert upload(browser, broken, 2) == "error"
    message = browser.find_element(By.ID, "message")
    assert message.is_displayed() and message.text.startswith("broken.jpg: unreadable image")
    assert not browser.find_elements(By.CSS_SELECTOR, "[data-net='0']")  # no result left beside the message
    assert upload(browser, photo, 3) == "done"
    check_result()
    origin = page.rstrip("/")
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map((r) => r.name)")
    assert loaded and all(name.startswith(origin + "/") for name in loaded), loaded  # nothing from the network
