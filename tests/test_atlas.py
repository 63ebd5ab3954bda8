"""The atlas site: what it writes, that re-runs are incremental, and that it works in a real browser.

Browser tests drive Debian's headless Chromium through selenium, over file:// and over a
loopback http.server. `make test` installs chromium and chromium-driver (`make browser`);
without /usr/bin/chromedriver those tests are skipped with that hint.
"""

from __future__ import annotations

import functools
import http.server
import io
import os
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline.atlas import main
from pipeline.views.atlas import build_site, model_slug
from synthetic_store import CLIP, DEIT, MODELS, RECORD_COUNT, write_examples, write_store

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[1]
WAIT_S = 10.0


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    records = write_store(root)
    planted = [r["key"] for r in records if r["weights"].startswith("planted")]
    write_examples(root, planted)
    out = tmp_path_factory.mktemp("site")
    build_site(str(root), out)
    return {"root": root, "out": out, "records": records, "planted": planted}


def test_site_has_a_page_image_and_thumbnail_per_key_and_an_embedded_index(site):
    out = site["out"]
    for record in site["records"]:
        key = record["key"]
        assert (out / "features" / f"{key}.html").is_file()
        assert (out / "images" / f"{key}.png").read_bytes() == record["png"]
        assert (out / "thumbs" / f"{key}.jpg").stat().st_size > 0
    assert {p.name for p in (out / "models").iterdir()} == {f"{model_slug(DEIT)}.html", f"{model_slug(CLIP)}.html"}
    assert model_slug(CLIP) != CLIP and "." not in model_slug(CLIP)
    assert (out / "atlas-index.js").read_text().startswith("window.ATLAS_INDEX = {")
    page = (out / "features" / f"{site['planted'][0]}.html").read_text()
    assert "planted: red" in page and '"lr": 0.1' in page  # label, and the config pretty-printed
    assert len(list((out / "examples").glob(f"{site['planted'][0]}-r*.jpg"))) == 3


def test_rerun_writes_only_new_keys_and_rewrites_the_index(site, tmp_path):
    root, out = tmp_path / "store", tmp_path / "site"
    write_store(root)
    (root / "examples").mkdir()  # an examples job that has committed nothing yet: no examples, no error
    first = build_site(str(root), out)
    assert (first.pages_written, first.pages_kept) == (RECORD_COUNT, 0)
    old_page = next((out / "features").iterdir())
    stamp = old_page.stat().st_mtime_ns

    assert build_site(str(root), out).pages_written == 0
    write_store(root, MODELS[2:], config_hash="cfg1")  # a second config of the CLIP model: 6 new keys
    again = build_site(str(root), out)
    assert (again.records, again.pages_written, again.pages_kept) == (RECORD_COUNT + 6, 6, RECORD_COUNT)
    assert old_page.stat().st_mtime_ns == stamp
    assert (out / "models" / f"{model_slug(CLIP)}.html").read_text().count("config cfg1") == 1


def test_an_interrupted_first_build_is_completed_by_the_next(tmp_path, monkeypatch):
    import pipeline.views.atlas as atlas

    write_store(tmp_path / "store")
    written = []

    def write_three_then_die(out, row, png, examples):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(row["key"])
        real_write_key(out, row, png, examples)

    real_write_key = atlas._write_key
    monkeypatch.setattr(atlas, "_write_key", write_three_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_site(str(tmp_path / "store"), tmp_path / "site", workers=1)
    monkeypatch.undo()
    resumed = build_site(str(tmp_path / "store"), tmp_path / "site")
    assert (resumed.pages_written, resumed.pages_kept) == (RECORD_COUNT, 0)
    assert len(list((tmp_path / "site" / "features").glob("*.html"))) == RECORD_COUNT


def test_cli_errors_are_one_paragraph_and_exit_2(site, tmp_path, capsys):
    def atlas(*args):  # in-process: `python -m pipeline.atlas` is main() with sys.argv
        return main(list(args)), capsys.readouterr()

    status, output = atlas(f"store.root={tmp_path / 'none'}", f"out={tmp_path / 'site'}")
    assert status == 2 and output.err.startswith("error: No store at") and output.err.count("\n") == 1
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    status, output = atlas(f"store.root={site['root']}", f"out={tmp_path / 'occupied'}")
    assert status == 2 and "holds no atlas" in output.err
    status, output = atlas("store.root")
    assert status == 2 and "not of the form key=value" in output.err
    status, output = atlas(f"store.root={site['root']}", f"out={site['out']}")
    assert status == 0 and f"{RECORD_COUNT} images of 2 models; wrote 0 new" in output.out


# ------------------------------------------------------------------ in a browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Chromium or chromedriver is not installed; `make browser` installs them (root + apt-get)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def http_base(site):
    """The site on a loopback static server, stopped when the module's tests are done."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep request lines out of the test output
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(QuietHandler, directory=str(site["out"])))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(params=["file", "http"])
def base_url(request, site):
    if request.param == "file":
        return site["out"].as_uri() + "/"
    return request.getfixturevalue("http_base")


def wait_for(condition, what: str):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {WAIT_S}s waiting for {what}")


# Images inside the viewport: lazy ones there load; the rest need not have loaded yet.
VISIBLE_IMAGES = """
return Array.from(document.images).filter(img => {
  const box = img.getBoundingClientRect();
  return img.offsetParent !== null && box.bottom > 0 && box.top < innerHeight && box.right > 0 && box.left < innerWidth;
}).map(img => [img.currentSrc || img.src, img.complete, img.naturalWidth]);
"""


def check_page(driver, what: str) -> None:
    """Every visible image has loaded and decoded, and the console has no errors."""
    images = wait_for(lambda: (lambda found: found if all(done for _, done, _ in found) else None)(
        driver.execute_script(VISIBLE_IMAGES)), f"the visible images of {what} to load")
    assert images, f"{what} shows no image"
    broken = [src for src, _, width in images if width == 0]
    assert not broken, f"{what} has broken images: {broken}"
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, f"{what} logged console errors: {errors}"


def visible(driver, selector: str):
    return [element for element in driver.find_elements("css selector", selector) if element.is_displayed()]


def test_navigation_index_to_model_to_feature(browser, base_url, site):
    from selenium.webdriver.common.by import By

    browser.get(base_url + "index.html")
    check_page(browser, "the index")
    families = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "section.family h2")]
    assert families == ["clip", "deit"]

    browser.find_element(By.LINK_TEXT, DEIT).click()
    wait_for(lambda: browser.find_element(By.TAG_NAME, "h1").text == DEIT, "the model page")
    check_page(browser, "the model page")
    random_weights = next(section for section in browser.find_elements(By.CSS_SELECTOR, "section.variant")
                          if "weights random-0" in section.text)
    rows = random_weights.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert [int(r.get_attribute("data-layer")) for r in rows] == [0, 1, 2, 3]  # early -> late, top to bottom

    planted = site["planted"][0]
    browser.find_element(By.CSS_SELECTOR, f'a[href="../features/{planted}.html"]').click()
    wait_for(lambda: "layer 1 · feature 0" in browser.find_element(By.TAG_NAME, "h1").text, "the feature page")
    check_page(browser, "the feature page")
    assert browser.find_element(By.CSS_SELECTOR, ".label").text == "planted: red"
    assert len(browser.find_elements(By.CSS_SELECTOR, ".examples img")) == 3
    assert "cfg0" in browser.find_element(By.CSS_SELECTOR, "table.provenance").text

    browser.find_element(By.LINK_TEXT, DEIT).click()  # the breadcrumb leads back to the model
    wait_for(lambda: browser.find_element(By.TAG_NAME, "h1").text == DEIT, "the model page again")


def test_filters_change_what_is_shown(browser, base_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(base_url + f"models/{model_slug(DEIT)}.html")
    check_page(browser, "the model page")
    assert browser.find_element(By.ID, "filter-count").text == "18 images"
    browser.find_element(By.ID, "filter-layer").send_keys("2-3")
    wait_for(lambda: browser.find_element(By.ID, "filter-count").text == "8 images", "the layer filter")
    assert {int(r.get_attribute("data-layer")) for r in visible(browser, "tbody tr")} == {2, 3}
    browser.find_element(By.ID, "filter-feature").send_keys("1")
    wait_for(lambda: browser.find_element(By.ID, "filter-count").text == "2 images", "the feature filter")
    assert {int(c.get_attribute("data-feature")) for c in visible(browser, "td[data-feature]")} == {1}
    check_page(browser, "the filtered model page")

    browser.get(base_url + "index.html")
    Select(browser.find_element(By.ID, "search-family")).select_by_value("clip")
    wait_for(lambda: [li.get_attribute("data-model") for li in visible(browser, "li.model")] == [CLIP],
             "the family filter")
    browser.find_element(By.ID, "search-layer").send_keys("1")
    browser.find_element(By.ID, "search-feature").send_keys("0-1")
    wait_for(lambda: browser.find_element(By.ID, "search-count").text == "2 matches", "the search")
    captions = [card.text for card in visible(browser, "#search-results .card")]
    assert len(captions) == 2 and all(caption.startswith(f"{CLIP} · L1 · f") for caption in captions)
    check_page(browser, "the search results")
    browser.find_element(By.ID, "search-results").find_element(By.TAG_NAME, "a").click()
    wait_for(lambda: "layer 1 · feature 0" in browser.find_element(By.TAG_NAME, "h1").text, "a search result's page")


@pytest.mark.skipif(not os.environ.get("ATLAS_SCREENSHOT"), reason="set ATLAS_SCREENSHOT=store-root to refresh docs")
def test_refresh_docs_screenshot(browser, tmp_path):
    """Rebuild docs/atlas.png: a model page of the store at $ATLAS_SCREENSHOT."""
    build_site(os.environ["ATLAS_SCREENSHOT"], tmp_path)
    page = next((tmp_path / "models").glob("*.html"))
    browser.set_window_size(1100, 760)
    browser.get(page.as_uri())
    check_page(browser, "the model page")
    screenshot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    screenshot.quantize(colors=128).save(REPO / "docs" / "atlas.png", optimize=True)  # palette PNG: small in git
