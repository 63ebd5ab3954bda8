"""The atlas site: what it writes, that re-runs are incremental, and that it works in a real browser.

Browser tests drive Debian's headless Chromium through selenium, over file:// and over a
loopback http.server. `make test` installs chromium and chromium-driver (`make browser`);
without /usr/bin/chromedriver those tests are skipped with that hint.
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import io
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.config import recorded_param
from pipeline.errors import PipelineError
from pipeline.store.errors import repair_command
from pipeline.store.png import decode_png, encode_png
from pipeline.views.atlas import build_site
from pipeline.views.slugs import key_slug, model_slug
from pipeline.views.thumbnails import thumbnail_pixels
from synthetic_store import CLIP, DEIT, MODELS, RECORD_COUNT, records, write_examples, write_raw_store, write_store

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
        assert (out / "thumbs" / f"{key}.png").stat().st_size > 0
    assert {p.name for p in (out / "models").iterdir()} == {f"{model_slug(DEIT)}.html", f"{model_slug(CLIP)}.html"}
    assert model_slug(CLIP) != CLIP and "." not in model_slug(CLIP)
    assert (out / "atlas-index.js").read_text().startswith("window.ATLAS_INDEX = {")
    assert sorted(record[0] for record in search_records(out)) == sorted(r["key"] for r in site["records"])
    page = (out / "features" / f"{site['planted'][0]}.html").read_text()
    assert "planted: red" in page and '"lr": 0.1' in page  # label, and the config pretty-printed
    assert len(list((out / "examples").glob(f"{site['planted'][0]}-r*.jpg"))) == 3


def test_rerun_writes_only_new_keys_and_rewrites_the_index(site, tmp_path):
    root, out = tmp_path / "store", tmp_path / "site"
    written = write_store(root)
    (root / "examples").mkdir()  # an examples job that has committed nothing yet: no examples, no error
    first = build_site(str(root), out)
    assert (first.pages_written, first.pages_kept) == (RECORD_COUNT, 0)
    deit_page = out / "features" / f"{next(r['key'] for r in written if r['model'] == DEIT)}.html"
    clip_page = out / "features" / f"{next(r['key'] for r in written if r['model'] == CLIP)}.html"
    stamp = deit_page.stat().st_mtime_ns

    assert build_site(str(root), out).pages_written == 0
    write_store(root, MODELS[2:], config_hash="cfg1")  # a second config of the CLIP model: 6 new keys
    again = build_site(str(root), out)
    # The 6 new pages, and the 6 CLIP pages of cfg0, which now show their unit under cfg1 beside them.
    assert (again.records, again.pages_written, again.pages_kept) == (RECORD_COUNT + 6, 12, RECORD_COUNT - 6)
    assert deit_page.stat().st_mtime_ns == stamp
    assert 'class="configs"' in clip_page.read_text() and 'class="configs"' not in deit_page.read_text()
    assert (out / "models" / f"{model_slug(CLIP)}.html").read_text().count("config cfg1") == 1


def test_an_interrupted_first_build_is_completed_by_the_next(tmp_path, monkeypatch):
    import pipeline.views.atlas as atlas

    write_store(tmp_path / "store")
    written = []

    def three_pages_then_die(row, *rest):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(row["key"])
        return real_feature_page(row, *rest)

    real_feature_page = atlas.feature_page
    monkeypatch.setattr(atlas, "feature_page", three_pages_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_site(str(tmp_path / "store"), tmp_path / "site", workers=1)
    monkeypatch.undo()
    resumed = build_site(str(tmp_path / "store"), tmp_path / "site")
    assert (resumed.pages_written, resumed.pages_kept) == (RECORD_COUNT, 0)
    assert len(list((tmp_path / "site" / "features").glob("*.html"))) == RECORD_COUNT


def configs_block(page: str) -> str:
    blocks = re.findall(r'<section class="configs">.*?</section>', page, re.S)
    assert len(blocks) <= 1
    return blocks[0] if blocks else ""


def test_a_feature_page_shows_its_unit_under_the_stores_other_configs_captioned_with_what_differs(tmp_path):
    from pipeline.store.schemas import unit_key
    from pipeline.store.store import Store

    root, out = tmp_path / "store", tmp_path / "site"
    written = []
    # Records made before the optim/param group name the parameterization; later ones hold its settings.
    nested = {"name": "maco", "auto_lr": {"default": 1.0}, "spectrum": "powerlaw", "alpha": 1.0}
    for param, lr in (("pixel", 0.1), ("fourier", 0.05), (nested, 1.0)):  # optim.lr=auto's per param
        for row in records(MODELS[:1], config_hash=f"cfg-{recorded_param({'param': param})}"):
            row["config"] = json.dumps({"optim": {"param": param, "lr": lr, "steps": 3}, "target": "mlp",
                                        **({"param_identity": {"name": "maco", "spectrum": "powerlaw-1.0",
                                                               "alpha": 1.0}} if param is nested else {})})
            written.append(row)
    unit = {name: written[5][name] for name in ("model", "weights", "target", "objective", "layer", "feature",
                                                 "config_hash")}
    other_seed = dict(written[5], seed=1, key=unit_key(**unit, seed=1))  # another unit: never beside seed 0
    with Store(str(root)).writer(commit_every=100) as writer:
        for row in [*written, other_seed]:
            writer.add(row)
    build_site(str(root), out)

    same = [r for r in written if (r["layer"], r["feature"]) == (written[5]["layer"], written[5]["feature"])]
    assert [recorded_param(json.loads(r["config"])["optim"]) for r in same] == ["pixel", "fourier", "maco"]
    for row in same:
        block = configs_block((out / "features" / f"{row['key']}.html").read_text())
        assert block.count("<img ") == 3 and "this page" in block
        others = [r for r in same if r is not row]
        assert sorted(re.findall(r'<a href="([^"]+)\.html">', block)) == sorted(r["key"] for r in others)
        assert other_seed["key"] not in block and f"thumbs/{row['key']}.png" in block
    block = configs_block((out / "features" / f"{same[0]['key']}.html").read_text())
    for caption in ("param=pixel", "param=fourier", "param=maco", "lr=0.05", "lr=1.0", "param.spectrum=powerlaw-1.0"):
        assert f"<code>{caption}</code>" in block
    assert "steps=" not in block and "target=" not in block  # what all three share is not a difference
    assert "auto_lr" not in block and "param_identity" not in block  # what repeats the lr and the settings
    assert configs_block((out / "features" / f"{other_seed['key']}.html").read_text()) == ""


def test_a_directions_unit_is_named_as_one_and_never_shown_as_another_config_of_the_channel(tmp_path):
    from pipeline.store.store import Store

    root, out = tmp_path / "store", tmp_path / "site"
    channel = records(MODELS[:1])[0]
    direction = records(MODELS[:1], config_hash="cfgD")[0]  # row 0 of a PCA: channel 0's numbers
    direction["config"] = json.dumps({"target": "mlp", "directions": {
        "path": "/data/deit-mlp-l00-pca-n8.npy", "sha256": "cd" * 32, "format": "npy"}})
    with Store(str(root)).writer(commit_every=10) as writer:
        writer.add(channel)
        writer.add(direction)
    build_site(str(root), out)

    page = (out / "features" / f"{direction['key']}.html").read_text()
    assert f"<title>{DEIT} · layer 0 · direction 0 of deit-mlp-l00-pca-n8.npy · vit-atlas</title>" in page
    assert "› direction 0 of deit-mlp-l00-pca-n8.npy</p>" in page and configs_block(page) == ""
    channel_page = (out / "features" / f"{channel['key']}.html").read_text()
    assert "› feature 0</p>" in channel_page and configs_block(channel_page) == ""
    model_page = (out / "models" / f"{model_slug(DEIT)}.html").read_text()
    assert model_page.count("units: the directions of deit-mlp-l00-pca-n8.npy") == 1


def test_cli_errors_are_one_paragraph_and_exit_2(site, tmp_path, capsys):
    def atlas(*args):  # in-process: `vit-atlas atlas ARGS` is main() with sys.argv
        return main(["atlas", *args]), capsys.readouterr()

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


def test_a_model_with_many_features_gets_pages_that_reach_every_feature(tmp_path, monkeypatch):
    import pipeline.views.pages as pages

    # The synthetic DEIT model's random weights have 16 images (4 layers x 4 features), its planted ones 2.
    monkeypatch.setattr(pages, "MODEL_PAGE_IMAGES", 8)
    monkeypatch.setattr(pages, "PAGE_FEATURES", 3)
    monkeypatch.setattr(pages, "SEARCH_PART_FEATURES", 2)
    written = write_store(tmp_path / "store")
    out = tmp_path / "site"
    build_site(str(tmp_path / "store"), out)
    models = out / "models"
    overview = (models / f"{model_slug(DEIT)}.html").read_text()
    assert overview.count("<img ") == 2  # the planted weights' grid; the random weights' only as links

    pages, queue, linked = set(), re.findall(r'<a href="([A-Za-z0-9_-]+)\.html">', overview), set()
    while queue:  # every page the overview links, and every page those link as previous / next
        name = queue.pop()
        if name in pages or name == model_slug(DEIT):
            continue
        pages.add(name)
        page = (models / f"{name}.html").read_text()
        queue += re.findall(r'<a href="([A-Za-z0-9_-]+)\.html" rel="(?:prev|next)"', page)
        cells = re.findall(r'<td data-feature="(\d+)"', page)
        assert 0 < len(cells) <= 3 and len(set(re.findall(r'<tr data-layer="(\d+)"', page))) == 1
        images = re.findall(r"<img [^>]*>", page)
        assert images and all('loading="lazy" width="128" height="128"' in image for image in images)
        linked.update(re.findall(r'href="\.\./features/([^"]+)\.html"', page))
    assert len(pages) == 4 * 2  # 4 layers, features 0-2 and 3
    assert linked == {r["key"] for r in written if r["weights"] == "random-0"}
    parts = search_index(out)["parts"]
    assert all(last // 2 == first // 2 for _, _, _, first, last, _ in parts)
    assert sorted(record[0] for record in search_records(out)) == sorted(r["key"] for r in written)


# ------------------------------------------------------------------ front page, thumbnails


def _strips(index_html: str) -> list[tuple[str, list[str]]]:
    """(label text, linked feature slugs) of each front-page strip, in page order."""
    found = []
    for chunk in index_html.split('<div class="strip-row">')[1:]:
        label = re.sub(r"<[^>]+>", "", chunk.split("</p>")[0]).strip()
        strip = chunk.split('<div class="strip">')[1].split("</div>")[0]
        found.append((" ".join(label.split()), re.findall(r'href="features/([^"]+)\.html"', strip)))
    return found


def test_front_page_shows_each_weights_strongest_feature_per_layer_real_and_planted_before_random(site):
    by_unit = {(r["model"], r["weights"], r["layer"], r["feature"]): key_slug(r["key"]) for r in site["records"]}
    strips = _strips((site["out"] / "index.html").read_text())
    # activation = layer + feature / 10 in the synthetic store: the last feature is each layer's strongest
    assert strips == [
        ("weights pretrained-openai", [by_unit[(CLIP, "pretrained-openai", layer, 2)] for layer in range(2)]),
        ("weights planted-v1-0 planted weights: units wired to known colours and gratings, a check of the method",
         [by_unit[(DEIT, "planted-v1-0", 1, 1)]]),
        ("weights random-0 random weights: a baseline, expected to look like noise",
         [by_unit[(DEIT, "random-0", layer, 3)] for layer in range(4)]),
    ]
    model_page = (site["out"] / "models" / f"{model_slug(DEIT)}.html").read_text()
    assert model_page.index("weights planted-v1-0") < model_page.index("weights random-0")
    assert "random weights: a baseline, expected to look like noise" in model_page


def _noise(size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _checker(size: int, cell: int) -> np.ndarray:
    rows, cols = np.indices((size, size)) // cell
    return np.repeat((((rows + cols) % 2) * 255).astype(np.uint8)[..., None], 3, axis=2)


@pytest.mark.parametrize("size", [224, 384, 160, 32])
@pytest.mark.parametrize("pattern", ["noise", "checker-1px", "checker-2px"])
def test_thumbnails_keep_fine_noisy_texture(size, pattern):
    image = {"noise": _noise, "checker-1px": lambda n: _checker(n, 1), "checker-2px": lambda n: _checker(n, 2)}[
        pattern](size)
    thumb = decode_png(encode_png(thumbnail_pixels(image)))  # what the site stores: lossless PNG
    assert max(thumb.shape[:2]) == min(size, 128)
    assert thumb.std() > 0.5 * image.std(), f"{pattern} at {size} px: std {thumb.std():.1f} of {image.std():.1f}"
    if size > 128:  # the method it replaces (Lanczos to 96 px, JPEG) greys the finest of them out
        old = Image.fromarray(image)
        old.thumbnail((96, 96), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        old.save(buffer, format="JPEG", quality=85)
        if pattern == "checker-1px":
            assert np.asarray(Image.open(buffer)).std() < 0.2 * image.std()


def test_site_thumbnails_are_lossless_and_as_textured_as_the_image(tmp_path):
    noisy = dict(records()[0], png=encode_png(_noise(224)), image_size=224)
    write_raw_store(tmp_path / "store", [noisy])
    build_site(str(tmp_path / "store"), tmp_path / "site")
    thumb = decode_png((tmp_path / "site" / "thumbs" / f"{key_slug(noisy['key'])}.png").read_bytes())
    assert thumb.shape == (128, 128, 3) and thumb.std() > 0.9 * _noise(224).std()


# ------------------------------------------------------------------ crafted keys and bad images

CRAFTED_KEYS = ["<script>alert(1)</script>", '"onmouseover=alert(2) x="', "/etc/passwd", "../../x",
                "..", "a\\b\x00c", "k" * 300]


@pytest.fixture(scope="module")
def crafted_site(tmp_path_factory):
    """A store whose keys, model, family, weights and labels are markup or paths; built into base/a/b/site."""
    base = tmp_path_factory.mktemp("crafted")
    template = records()[0]
    crafted = []
    for number, key in enumerate(CRAFTED_KEYS):
        crafted.append(dict(template, key=key, feature=number, activation=float(number),
                            label=f"</p><script>alert({number})</script>",
                            model="<img src=x onerror=alert(3)>" if number % 2 else template["model"],
                            family='"><svg onload=alert(4)>', weights='random-0"><b>',
                            config='{"x": "</pre><script>alert(5)</script>"}'))
    write_raw_store(base / "store", crafted)
    write_examples(base / "store", [CRAFTED_KEYS[0], CRAFTED_KEYS[3]])
    out = base / "a" / "b" / "site"
    build_site(str(base / "store"), out)
    return {"base": base, "out": out, "records": crafted}


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


SAFE_FILE = re.compile(r"[A-Za-z0-9_-]{1,120}(-r\d+)?\.(html|png|jpg|js|css|json)")
SAFE_LINK = re.compile(r"(\.\./)?((features|models|images|thumbs|examples)/)?[A-Za-z0-9_-]{1,120}(-r\d+)?"
                       r"\.(html|png|jpg|js|css)|data:,")


def test_crafted_keys_write_no_file_outside_the_site_and_every_name_is_a_slug(crafted_site):
    base, out = crafted_site["base"], crafted_site["out"]
    outside = [p for p in base.rglob("*") if p.is_file() and out not in p.parents and (base / "store") not in p.parents]
    assert outside == []
    assert not (out.parent / "x.html").exists() and not (base / "a" / "x").exists()
    for path in out.rglob("*"):
        assert path.parent == out or path.parent.parent == out, path
        if path.is_file():
            assert SAFE_FILE.fullmatch(path.name), path.name
    assert len(list((out / "features").iterdir())) == len(CRAFTED_KEYS)
    assert len(list((out / "examples").iterdir())) == 6


def test_crafted_text_is_escaped_wherever_it_lands(crafted_site):
    out = crafted_site["out"]
    pages = [out / "index.html", *(out / "models").iterdir(), *(out / "features").iterdir()]
    for page in pages:
        source = page.read_text()
        assert "alert" not in source or "<script>alert" not in source, page
        for needle in ("<img src=x", "<svg onload", "<b>", "</pre><script>"):
            assert needle not in source, (page, needle)
        parser = _Tags()
        parser.feed(source)
        for tag, attrs in parser.tags:
            assert not [name for name in attrs if name.startswith("on")], (page, tag, attrs)
            assert tag != "script" or attrs.get("src") in ("atlas.js", "atlas-index.js", "../atlas.js"), (page, attrs)
            for name in ("href", "src"):
                if name in attrs:
                    assert SAFE_LINK.fullmatch(attrs[name]), (page, tag, attrs)
    feature = (out / "features" / f"{key_slug(CRAFTED_KEYS[0])}.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in feature  # the key, shown escaped in the provenance
    assert "&lt;/p&gt;&lt;script&gt;alert(0)&lt;/script&gt;" in feature  # the label
    assert "&lt;/pre&gt;&lt;script&gt;alert(5)&lt;/script&gt;" in feature  # the config
    records = search_records(out)
    assert {record[0] for record in records} == {key_slug(key) for key in CRAFTED_KEYS}
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", record[0]) for record in records)


def search_index(out: Path) -> dict:
    return json.loads((out / "atlas-index.js").read_text().removeprefix("window.ATLAS_INDEX = ").rstrip(";\n"))


def search_records(out: Path) -> list[list]:
    """Every record of the site's search index, from its parts (search/<part>.js)."""
    found = []
    for stem, *_ in search_index(out)["parts"]:
        text = (out / "search" / f"{stem}.js").read_text()
        found += json.loads(text[text.index("] = ") + 4:].rstrip(";\n"))
    return found


def test_keys_that_would_share_a_page_are_refused_before_anything_is_written(tmp_path):
    template = records()[0]
    for keys in (["x/y", key_slug("x/y")], ["Key1", "key1"], [""]):
        root = tmp_path / f"store-{len(list(tmp_path.iterdir()))}"
        write_raw_store(root, [dict(template, key=key, feature=i) for i, key in enumerate(keys)])
        with pytest.raises(PipelineError) as error:
            build_site(str(root), tmp_path / "site")
        message = str(error.value)
        assert "\n" not in message and all(repr(key) in message for key in keys if key), message
        assert not (tmp_path / "site").exists()


def test_a_record_whose_png_does_not_decode_gets_a_placeholder_a_warning_and_a_count(tmp_path, caplog, capsys):
    good, bad, cut = records()[:3]
    bad = dict(bad, png=b"this is not a png")
    cut = dict(cut, png=cut["png"][:60])
    write_raw_store(tmp_path / "store", [good, bad, cut])
    with caplog.at_level(logging.WARNING, logger="pipeline.views.atlas"):
        report = build_site(str(tmp_path / "store"), tmp_path / "site")
    assert report.unreadable == tuple(sorted([bad["key"], cut["key"]]))
    assert report.pages_written == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    for record, message in zip(sorted([bad, cut], key=lambda r: r["key"]), sorted(warnings)):
        assert repr(record["key"]) in message and "does not decode" in message
        assert repair_command(str(tmp_path / "store")) in message and "re-run the sweep" in message
    site = tmp_path / "site"
    page = (site / "features" / f"{bad['key']}.html").read_text()
    assert "does not decode" in page and 'class="visualization placeholder"' in page and repair_command("STORE") in page
    assert not (site / "images" / f"{bad['key']}.png").exists()
    assert decode_png((site / "thumbs" / f"{bad['key']}.png").read_bytes()).shape == (128, 128, 3)
    assert (site / "images" / f"{good['key']}.png").read_bytes() == good["png"]
    assert 'class="unreadable"' in (site / "models" / f"{model_slug(DEIT)}.html").read_text()

    # the next build tries them again (a repaired store would show them) and still counts them
    status = main(["atlas", f"store.root={tmp_path / 'store'}", f"out={site}"])
    out = capsys.readouterr().out
    assert status == 0
    assert "wrote 2 new feature pages, kept 1; 2 images unreadable, shown as placeholders (see the warnings)" in out


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


def test_crafted_keys_run_no_script_in_a_browser(browser, crafted_site):
    """The pages of the crafted store load, link and search without running any of its text as script."""
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    out = crafted_site["out"]
    marker = "window.__injected = (window.__injected || 0) + 1"
    for page in ["index.html", *(f"{p.parent.name}/{p.name}" for p in sorted((out / "models").iterdir())),
                 f"features/{key_slug(CRAFTED_KEYS[0])}.html", f"features/{key_slug(CRAFTED_KEYS[1])}.html"]:
        browser.get((out / page).as_uri())
        browser.execute_script(marker.replace("+ 1", "+ 0"))
        if page == "index.html":
            browser.find_element(By.ID, "search-feature").send_keys("0-9")
            wait_for(lambda: browser.find_element(By.ID, "search-count").text == f"{len(CRAFTED_KEYS)} matches",
                     "the search over crafted records")
            hrefs = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#search-results a")]
            assert all(href.startswith(out.as_uri() + "/features/") for href in hrefs), hrefs
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018  (an injected alert() would be open now)
        assert browser.execute_script("return document.querySelectorAll('svg[onload], img[onerror], b').length") == 0


@pytest.mark.skipif(not os.environ.get("ATLAS_SCREENSHOT"), reason="set ATLAS_SCREENSHOT=store-root to refresh docs")
def test_refresh_docs_screenshot(browser, tmp_path):
    """Rebuild docs/atlas.png: a model page of the store at $ATLAS_SCREENSHOT ($ATLAS_SCREENSHOT_MODEL's, if set)."""
    build_site(os.environ["ATLAS_SCREENSHOT"], tmp_path)
    page = next((tmp_path / "models").glob(f"{os.environ.get('ATLAS_SCREENSHOT_MODEL', '*')}.html"))
    browser.set_window_size(1100, 760)
    browser.get(page.as_uri())
    check_page(browser, "the model page")
    screenshot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    screenshot.quantize(colors=128).save(REPO / "docs" / "atlas.png", optimize=True)  # palette PNG: small in git


def test_the_model_page_sorts_and_filters_each_layers_features_by_any_descriptor(site):
    from pipeline.views.pages import SORTABLE

    page = (site["out"] / "models" / f"{model_slug(DEIT)}.html").read_text()
    options = re.findall(r'<option value="([a-z_]+)">', page[page.index('id="sort-by"'):page.index("</select>",
                                                                                                page.index('id="sort-by"'))])
    assert options == list(SORTABLE) and "spectral_centroid" in options and "superstimulus_ratio" in options
    assert 'id="sort-order"' in page and 'id="filter-min"' in page
    record = next(r for r in site["records"] if r["weights"] == "random-0" and (r["layer"], r["feature"]) == (2, 1))
    cell = re.search(r'<tr data-layer="2">.*?(<td data-feature="1"[^>]*>)', page[page.index("random-0"):], re.S)[1]
    assert f'data-m-edge_density="{record["edge_density"]:.6g}"' in cell
    assert f'data-m-activation_noise="{record["activation_noise"]:.6g}"' in cell
    script = (site["out"] / "atlas.js").read_text()
    assert "function sortGrid()" in script and 'getElementById("sort-by")' in script


def test_the_feature_page_shows_measurements_with_baselines_ratio_and_reliability(site):
    planted = next(r for r in site["records"] if r["key"] == site["planted"][0])
    page = (site["out"] / "features" / f"{planted['key']}.html").read_text()
    block = page[page.index('<section class="measurements">'):]
    block = block[:block.index("</section>")]
    assert f"{planted['activation_noise']:.4g}" in block and f"{planted['activation_grey']:.4g}" in block
    assert f"{planted['activation'] / 3.0:.3g}" in block  # write_examples: the top natural activation is 3.0
    assert "spectral_centroid" in block and "cycles/pixel" in block and "reliability across seeds" in block
    assert "<th>embedding</th>" not in page  # the vector is the readers' business, not the page's


def test_the_feature_page_draws_the_unaugmented_curve_and_the_optimizers_objective_beneath_it(site):
    record = next(r for r in site["records"] if r["key"] == site["planted"][0])
    page = (site["out"] / "features" / f"{record['key']}.html").read_text()
    curve, trace = record["activation_curve"], record["activation_trace"]
    figure = page[page.index('<p class="activation">'):page.index("</div></div>")]
    assert figure.index('<svg class="curve"') < figure.index('<svg class="trace"')  # the curve first, the trace below
    assert (f"activation of the un-augmented image during optimization: {curve[0]:.4g} → {curve[-1]:.4g} "
            f"(range {min(curve):.4g} to {max(curve):.4g})") in figure
    assert (f"mean score of the augmented copies (colour-shifted, noised, jittered; a fresh draw at each point): "
            f"{trace[0]:.4g} → {trace[-1]:.4g}") in figure
    assert curve[-1] == record["activation"] and "predates" not in figure
    polyline = re.search(r'<svg class="curve".*?points="([^"]+)"', figure)[1].split()
    assert len(polyline) == len(curve) and polyline[-1] == "240.0,0.0"  # rising: it ends at the top


def test_a_record_from_before_the_curve_shows_its_trace_as_the_optimizers_objective(tmp_path):
    from synthetic_store import write_v2_store

    (record,) = write_v2_store(tmp_path / "store", [(DEIT, "deit", "random-0", [2], [1], {})])
    assert main(["atlas", f"store.root={tmp_path / 'store'}", f"out={tmp_path / 'site'}"]) == 0
    page = (tmp_path / "site" / "features" / f"{record['key']}.html").read_text()
    trace = record["activation_trace"]
    assert '<svg class="curve"' not in page and "un-augmented image during" not in page
    assert ("mean score of the augmented copies (colour-shifted, noised, jittered; a fresh draw at each point), not "
            f"this image&#39;s activation; the record predates the un-augmented curve: {trace[0]:.4g} → {trace[-1]:.4g}"
            ) in page
    assert "<th>activation_curve</th><td>—</td>" in page


def test_a_v1_record_page_says_how_to_measure_it(tmp_path):
    from synthetic_store import write_v1_store

    write_v1_store(tmp_path / "store", [m for m in MODELS if m[0] == DEIT][:1])
    build_site(str(tmp_path / "store"), tmp_path / "site")
    page = next((tmp_path / "site" / "features").iterdir()).read_text()
    assert "Not measured" in page and "vit-atlas describe" in page
