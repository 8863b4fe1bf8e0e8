"""Remote inputs through GDAL (http(s)://, s3://, /vsicurl/) and STAC items, against a small HTTP server with
Range support on 127.0.0.1 serving COGs written here; results must equal the same scene read locally."""

from __future__ import annotations

import json
import re
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import rasterio
import rasterio.shutil

from seglstm.inference.scene import InputOptions, SceneError, open_input
from tests.scene_helpers import MEAN3, STD3, T4, U3, RuleModel, read, rule_reference, run, write_tif


class RangeHandler(SimpleHTTPRequestHandler):
    """Static files with single byte ranges (what GDAL's /vsicurl/ asks for); logs each GET."""

    log: ClassVar[list] = []  # (path, range header, bytes sent), one list per server

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path.split("?")[0]))
        header = self.headers.get("Range")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", header or "")
        if match:
            start = int(match[1])
            end = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
            body = data[start : end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.log.append((self.path, header, len(body)))

    def do_HEAD(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()


@pytest.fixture
def server(tmp_path, monkeypatch):
    root = tmp_path / "www"
    root.mkdir()
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")

    class Handler(RangeHandler):
        log: ClassVar[list] = []

        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", Handler.log
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def gdal_http():
    """No directory listing probes, no retries (each test has its own server, so no cache is shared)."""
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR", GDAL_HTTP_MAX_RETRY=0, GDAL_HTTP_TIMEOUT=20):
        yield


pytestmark = pytest.mark.usefixtures("one_thread")


def cog(src: Path, dst: Path) -> Path:
    rasterio.shutil.copy(src, dst, driver="COG", BLOCKSIZE=256, COMPRESS="DEFLATE")
    return dst


@pytest.fixture
def scene(tmp_path, server):
    root = server[0]
    rng = np.random.default_rng(99)
    raw = rng.integers(1, 256, (3, 700, 650), dtype=np.uint8)
    local = write_tif(tmp_path / "scene.tif", raw)
    cog(local, root / "scene.tif")
    for i, name in enumerate(("red", "green", "blue")):
        write_tif(tmp_path / f"{name}.tif", raw[i : i + 1])
        cog(tmp_path / f"{name}.tif", root / f"{name}.tif")
    item = {
        "type": "Feature", "stac_version": "1.0.0", "id": "scene", "stac_extensions": [],
        "geometry": None, "properties": {"datetime": "2024-05-01T10:00:00Z"}, "links": [],
        "assets": {
            "visual": {"href": "scene.tif", "type": "image/tiff; application=geotiff; profile=cloud-optimized"},
            **{n: {"href": f"./{n}.tif", "type": "image/tiff"} for n in ("red", "green", "blue")},
        },
    }
    (root / "item.json").write_text(json.dumps(item))
    return raw, local


def predict(src, out, **kw):
    return run(RuleModel(U3, MEAN3, STD3, T4), src, out, MEAN3, STD3, 4, tile=128, overlap=32, **kw)


def test_http_cog_is_read_by_ranges_and_equals_the_local_result(tmp_path, server, scene):
    root, url, log = server
    raw, local = scene
    predict(local, tmp_path / "local.tif")
    size = (root / "scene.tif").stat().st_size
    (root / "copy.tif").write_bytes((root / "scene.tif").read_bytes())  # GDAL caches by URL: a new one
    for name, href in (("http", f"{url}/scene.tif"), ("vsicurl", f"/vsicurl/{url}/copy.tif")):
        log.clear()
        predict(href, tmp_path / f"{name}.tif")
        np.testing.assert_array_equal(read(tmp_path / f"{name}.tif")[0], read(tmp_path / "local.tif")[0])
        gets = [entry for entry in log if entry[0] in ("/scene.tif", "/copy.tif")]
        assert gets and all(h is not None for _, h, _ in gets), (name, log)  # every GET asked for ranges
    log.clear()
    (root / "window.tif").write_bytes((root / "scene.tif").read_bytes())
    with open_input(f"{url}/window.tif") as source:  # one window: its tile and the header, not the file
        values, _, valid = source.read([1, 2, 3], window=rasterio.windows.Window(300, 300, 64, 64))
    np.testing.assert_array_equal(values, raw[:, 300:364, 300:364])
    assert valid.all() and 0 < sum(n for _, _, n in log) < size / 4
    np.testing.assert_array_equal(read(tmp_path / "local.tif")[0][0], rule_reference(raw, U3, T4))


def test_s3_url_through_gdal(tmp_path, server, scene, monkeypatch):
    root, url, log = server
    raw, _ = scene
    (root / "bucket").mkdir()
    cog(root / "scene.tif", root / "bucket" / "scene.tif")
    env = dict(AWS_S3_ENDPOINT=url.removeprefix("http://"), AWS_HTTPS="NO", AWS_VIRTUAL_HOSTING="FALSE",
               AWS_NO_SIGN_REQUEST="YES")
    with rasterio.Env(**env):
        predict("s3://bucket/scene.tif", tmp_path / "s3.tif")
    assert any(p == "/bucket/scene.tif" and h for p, h, _ in log), log
    np.testing.assert_array_equal(read(tmp_path / "s3.tif")[0][0], rule_reference(raw, U3, T4))


def test_stac_item_assets_are_stacked_and_equal_the_three_band_scene(tmp_path, server, scene):
    root, url, _ = server
    raw, _ = scene
    expected = rule_reference(raw, U3, T4)
    predict(f"{url}/item.json", tmp_path / "stacked.tif", input_options=InputOptions(assets=("red", "green", "blue")))
    np.testing.assert_array_equal(read(tmp_path / "stacked.tif")[0][0], expected)
    swapped = rule_reference(raw[[2, 1, 0]], U3, T4)
    predict(root / "item.json", tmp_path / "bgr.tif", input_options=InputOptions(assets=("blue", "green", "red")))
    np.testing.assert_array_equal(read(tmp_path / "bgr.tif")[0][0], swapped)
    predict(f"{url}/item.json", tmp_path / "visual.tif", input_options=InputOptions(assets=("visual",)))
    np.testing.assert_array_equal(read(tmp_path / "visual.tif")[0][0], expected)
    with rasterio.open(tmp_path / "visual.tif") as ds, rasterio.open(root / "scene.tif") as ref:
        assert ds.crs == ref.crs and ds.transform == ref.transform

    with pytest.raises(SceneError, match=r"--asset\(s\) nir not in STAC item .*item\.json; it has blue, green"):
        predict(f"{url}/item.json", tmp_path / "x.tif", input_options=InputOptions(assets=("nir",)))
    with pytest.raises(SceneError, match=r"is a STAC item: choose its bands with --asset"):
        predict(f"{url}/item.json", tmp_path / "x.tif")
    with pytest.raises(SceneError, match=r"--asset/--assets need a STAC item"):
        predict(f"{url}/scene.tif", tmp_path / "x.tif", input_options=InputOptions(assets=("red",)))
    with pytest.raises(SceneError, match=r"input .*missing\.tif is not a readable raster"):
        predict(f"{url}/missing.tif", tmp_path / "x.tif")
