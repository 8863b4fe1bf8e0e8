"""Weights by name: download once from a local HTTP server into a temporary torch hub cache, verify, load.

The files are built here in the layout NX-AI publishes (the state dict of its training code under
``state_dict``: ``xlstm.blocks.{i}.xlstm.*``, ``xlstm.blocks.{i}.xlstm_norm.*``, ``xlstm.post_blocks_norm``,
``head.0`` / ``head.1``; the renaming its hubconf.py undoes), for a small encoder registered by the test.
No address other than 127.0.0.1 is contacted.
"""

from __future__ import annotations

import hashlib
import io
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from seglstm.cli.main import main as cli
from seglstm.models import pretrained
from seglstm.models.checkpoint import load_pretrained
from seglstm.models.pretrained import PretrainedWeights, PretrainedWeightsError
from seglstm.models.registry import create_encoder
from seglstm.models.seglstm import _create_seglstm
from seglstm.models.vil import VisionLSTM
from seglstm.models.vil.encoder import _create_vil

NAME, FILE = "vil_pt_tiny_in1k", "vil_pt_tiny16_in1k.th"
DIM, DEPTHS = 32, (2, 2, 2, 2)


def vil_pt_tiny(**kwargs) -> VisionLSTM:
    return _create_vil(DIM, DEPTHS, **kwargs)


def published_layout(model: VisionLSTM, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors under the names of a published Vision-LSTM v1 file for ``model``'s shapes."""
    flat = [(s + 1, j) for s, d in enumerate(model.depths) for j in range(d)]
    index = {f"blocks{s}.{j}.": i for i, (s, j) in enumerate(flat)}
    sd = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in index if key.startswith(p)), None)
        if prefix is not None:
            rest = key[len(prefix):]
            rest = "xlstm_norm." + rest[len("norm."):] if rest.startswith("norm.") else "xlstm." + rest[len("layer."):]
            key = f"xlstm.blocks.{index[prefix]}.{rest}"
        sd[key] = torch.randn(value.shape, generator=gen)
    dim = model.embed_dim
    sd |= {
        "xlstm.post_blocks_norm.weight": torch.randn(dim, generator=gen),
        "head.0.weight": torch.randn(dim, generator=gen),
        "head.0.bias": torch.randn(dim, generator=gen),
        "head.1.weight": torch.randn(1000, dim, generator=gen),
        "head.1.bias": torch.randn(1000, generator=gen),
    }
    return sd


def ours(key: str, depths: tuple[int, ...]) -> str | None:
    """Our encoder's key for a published key (None for the classifier parts), written out independently of
    the loader: block i of the flat list is block j of stage s."""
    if not key.startswith("xlstm.blocks."):
        return None if key.startswith(("xlstm.post_blocks_norm", "head.")) else key
    i, rest = key[len("xlstm.blocks."):].split(".", 1)
    stage, j = 0, int(i)
    while j >= depths[stage]:
        j -= depths[stage]
        stage += 1
    rest = "norm." + rest[len("xlstm_norm."):] if rest.startswith("xlstm_norm.") else "layer." + rest[len("xlstm."):]
    return f"blocks{stage + 1}.{j}.{rest}"


def to_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save({"state_dict": sd}, buf)
    return buf.getvalue()


class Server:
    """Serves ``files`` (name -> bytes) on 127.0.0.1 and counts the requests per path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: dict[str, int] = {}
        files, hits = self.files, self.hits

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.rsplit("/", 1)[-1]
                hits[name] = hits.get(name, 0) + 1
                if name not in files:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(files[name])))
                self.end_headers()
                self.wfile.write(files[name])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/weights/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server(monkeypatch, tmp_path, registry):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    srv = Server()
    monkeypatch.setenv(pretrained.BASE_URL_ENV, srv.url)
    registry.encoder(vil_pt_tiny)
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def register(monkeypatch, data: bytes | None = None, **fields) -> PretrainedWeights:
    """Register the test's weights name; ``data`` sets the published size and SHA-256."""
    if data is not None:
        fields = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), **fields}
    weights = PretrainedWeights(NAME, FILE, "vil-pt-tiny", ("vil_pt_tiny",), DIM, sum(DEPTHS), **fields)
    monkeypatch.setitem(pretrained.VIL_WEIGHTS, NAME, weights)
    return weights


def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "torch" / "hub" / "checkpoints"


def assert_loaded(encoder: VisionLSTM, sd: dict[str, torch.Tensor]) -> None:
    own = encoder.state_dict()
    mapped = {ours(k, DEPTHS): v for k, v in sd.items() if ours(k, DEPTHS) is not None}
    assert set(mapped) == set(own)
    for key, value in mapped.items():
        assert torch.equal(own[key], value), key


@pytest.fixture
def published(server, monkeypatch):
    gen = torch.Generator().manual_seed(11)
    sd = published_layout(VisionLSTM(img_size=224, embed_dim=DIM, depths=(8,)), gen)  # 14x14 table, 8 blocks
    data = to_bytes(sd)
    server.files[FILE] = data
    register(monkeypatch, data)
    return sd, data


def test_downloaded_once_then_cached_and_loaded(published, server, tmp_path, capfd):
    sd, data = published
    encoder = create_encoder("vil_pt_tiny", img_size=224, pretrained=NAME)
    assert server.hits == {FILE: 1}
    assert_loaded(encoder, sd)
    err = capfd.readouterr().err
    assert f"downloading {server.url}{FILE}" in err and "100%" in err  # the progress bar ran to the end
    cached = cache_dir(tmp_path) / FILE
    assert cached.read_bytes() == data
    assert sorted(p.name for p in cache_dir(tmp_path).iterdir()) == [FILE]  # no temporary file left

    # a segmentor preset takes the name too (model.model_kwargs.pretrained), from the cache this time
    model = _create_seglstm("fcn", "vil_pt_tiny", num_classes=3, img_size=224, pretrained=NAME)
    assert server.hits == {FILE: 1}
    assert_loaded(model.backbone, sd)


@pytest.mark.parametrize("published_size", [True, False])
def test_truncated_file_is_refused_and_not_cached(published, server, tmp_path, monkeypatch, published_size):
    _, data = published
    server.files[FILE] = data[: len(data) // 2]
    if not published_size:  # then the file itself is found unreadable
        register(monkeypatch)
    with pytest.raises(PretrainedWeightsError) as info:
        create_encoder("vil_pt_tiny", img_size=224, pretrained=NAME)
    text = str(info.value)
    assert f"{server.url}{FILE} (for {NAME})" in text and "\n" not in text
    if published_size:
        assert f"got {len(data) // 2} bytes, expected {len(data)}" in text
    else:
        assert "truncated or not a torch checkpoint" in text
    assert list(cache_dir(tmp_path).iterdir()) == []


def test_damaged_cached_file_says_to_delete_it(published, server, tmp_path):
    cache_dir(tmp_path).mkdir(parents=True)
    cached = cache_dir(tmp_path) / FILE
    cached.write_bytes(published[1][:1000])  # e.g. a copy cut short by a full disk
    with pytest.raises(PretrainedWeightsError) as info:
        create_encoder("vil_pt_tiny", img_size=224, pretrained=True)
    text = str(info.value)
    assert str(cached) in text and "truncated" in text and text.endswith("delete this cached file to download it again")
    assert server.hits == {}


def test_wrong_hash_is_refused(published, server, tmp_path, monkeypatch):
    _, data = published
    register(monkeypatch, size=len(data), sha256=hashlib.sha256(b"other").hexdigest())
    with pytest.raises(PretrainedWeightsError, match=r"SHA-256 [0-9a-f]{64} differs from the published"):
        create_encoder("vil_pt_tiny", img_size=224, pretrained=NAME)
    assert list(cache_dir(tmp_path).iterdir()) == []


def test_wrong_keys_are_named_and_not_cached(published, server, tmp_path, monkeypatch):
    sd, _ = published
    sd = dict(sd)
    del sd["xlstm.blocks.2.xlstm.q_proj.weight"]
    sd["xlstm.blocks.1.xlstm.extra_gate"] = torch.randn(4)
    server.files[FILE] = data = to_bytes(sd)
    register(monkeypatch, data)
    with pytest.raises(PretrainedWeightsError) as info:
        create_encoder("vil_pt_tiny", img_size=224, pretrained=NAME)
    text = str(info.value)
    assert "missing keys (1): blocks2.0.layer.q_proj.weight" in text
    assert "unexpected keys (1): blocks1.1.layer.extra_gate" in text
    assert list(cache_dir(tmp_path).iterdir()) == []


def test_http_error_and_closed_port_say_offline(server, monkeypatch, tmp_path):
    register(monkeypatch)  # the server has no such file: 404
    with pytest.raises(PretrainedWeightsError) as info:
        create_encoder("vil_pt_tiny", pretrained=NAME)
    text = str(info.value)
    assert f"cannot download {server.url}{FILE} (HTTP Error 404" in text and "pass the local file" in text
    assert text.endswith(f"or copy it to {cache_dir(tmp_path) / FILE}")
    assert "\n" not in text

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv(pretrained.BASE_URL_ENV, f"http://127.0.0.1:{port}")
    with pytest.raises(PretrainedWeightsError, match=rf"cannot download http://127\.0\.0\.1:{port}/{FILE} \(.*refused"):
        create_encoder("vil_pt_tiny", pretrained=NAME)
    assert not cache_dir(tmp_path).exists() or list(cache_dir(tmp_path).iterdir()) == []


def test_local_path_is_always_accepted(published, server, tmp_path, monkeypatch):
    sd, data = published
    path = tmp_path / "downloaded_by_hand.th"
    path.write_bytes(data)
    assert_loaded(create_encoder("vil_pt_tiny", img_size=224, pretrained=str(path)), sd)
    monkeypatch.chdir(tmp_path)  # a file named like a weights name is a file first
    Path(NAME).write_bytes(data)
    assert_loaded(create_encoder("vil_pt_tiny", img_size=224, pretrained=NAME), sd)
    assert server.hits == {}


def test_weights_that_do_not_fit_are_refused_before_downloading(published, server):
    with pytest.raises(PretrainedWeightsError, match=rf"{NAME} fits vil_pt_tiny \(width 32, 8 blocks.*width 48, 8"):
        _create_vil(48, DEPTHS, pretrained=NAME)
    assert server.hits == {}
    with pytest.raises(PretrainedWeightsError, match="pretrained=True: no published weights fit this model"):
        _create_vil(48, DEPTHS, pretrained=True)
    assert server.hits == {}


def test_pretrained_true_takes_the_first_name_that_fits(published, server):
    sd, _ = published
    assert_loaded(create_encoder("vil_pt_tiny", img_size=224, pretrained=True), sd)
    assert server.hits == {FILE: 1}
    with torch.device("meta"):  # the real presets: which name True means (nothing is fetched here)
        assert pretrained._default_for(create_encoder("vil_s")) == "vil_s_in1k"
        assert pretrained._default_for(create_encoder("vil_t_44124")) == "vil_t_in1k"
        assert pretrained._default_for(create_encoder("vil_b")) == "vil_b_in1k"


def entry(listing: str, name: str) -> str:
    """The indented lines under ``name`` in the ``seglstm weights`` listing."""
    lines = listing.splitlines()
    start = lines.index(f"  {name}") + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("    ")), len(lines))
    return "\n".join(lines[start:end])


def test_cli_lists_names_and_cache_state(published, server, tmp_path, capsys):
    assert cli(["weights"]) == 0
    listing = capsys.readouterr().out
    assert "encoders: vil_pt_tiny (width 32, 8 blocks)" in entry(listing, NAME)
    assert f"{server.url}{FILE}" in entry(listing, NAME) and "cached:   not cached" in entry(listing, NAME)
    assert "models:   deeplabv3plus_r50, pspnet_r50" in entry(listing, "resnet50.a1_in1k")

    assert cli(["weights", "download", NAME, "--quiet"]) == 0
    cached = cache_dir(tmp_path) / FILE
    assert capsys.readouterr().out.strip() == f"{NAME}: {cached}"
    assert cli(["weights"]) == 0
    listing = capsys.readouterr().out
    assert f"cached:   {cached} ({cached.stat().st_size / 2**20:.1f} MiB)" in entry(listing, NAME)
    assert server.hits == {FILE: 1}
    assert cli(["weights", "download", "vil_nonexistent"]) == 2


@pytest.mark.parametrize("name", sorted(pretrained.VIL_WEIGHTS))
def test_published_names_fit_their_encoders(name):
    """Each listed name's layout (width, 24 flat blocks, 224-pixel table) loads strictly into every encoder
    it names, checked on the meta device (no memory)."""
    weights = pretrained.VIL_WEIGHTS[name]
    with torch.device("meta"):
        flat = VisionLSTM(img_size=224, embed_dim=weights.embed_dim, depths=(weights.depth,))
        sd = {k: torch.empty_like(v) for k, v in published_layout(flat, torch.Generator()).items()}
        for encoder_name in weights.encoders:
            report = load_pretrained(create_encoder(encoder_name), sd)
            assert report.format == "vision-lstm-v1" and not report.missing_keys


def test_timm_names_offline_and_local_file(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf
    import timm

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # the hub answers from its (empty) cache only
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    from seglstm.models.registry import create_model

    with pytest.raises(PretrainedWeightsError, match=r"cannot fetch timm's pretrained weights for 'resnet18\.a2_in1k'.*pretrained=PATH"):
        create_model("deeplabv3plus_r18", num_classes=3, pretrained="resnet18.a2_in1k")
    with pytest.raises(ValueError, match=r"'resnet50\.a1_in1k' is neither a file nor a timm pretrained name of resnet18"):
        create_model("deeplabv3plus_r18", num_classes=3, pretrained="resnet50.a1_in1k")

    torch.manual_seed(0)
    reference = timm.create_model("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = create_model("deeplabv3plus_r18", num_classes=3, pretrained=str(path))
    assert torch.equal(model.backbone.model.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.backbone.model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_rebuilding_a_trained_checkpoint_does_not_fetch_its_start_weights(published, server, registry, tmp_path):
    from seglstm.config import META_KEY
    from seglstm.inference.loading import load_segmentor
    from seglstm.models.registry import create_model

    def seglstm_fcn_pt_tiny(**kwargs):
        return _create_seglstm("fcn", "vil_pt_tiny", **kwargs)

    registry.model(seglstm_fcn_pt_tiny)
    kwargs = {"img_size": 224, "pretrained": NAME}
    trained = create_model("seglstm_fcn_pt_tiny", num_classes=3, **kwargs)
    with torch.no_grad():
        for p in trained.parameters():  # "training" moved every weight away from the start weights
            p.add_(torch.randn_like(p))
    meta = {"model": "seglstm_fcn_pt_tiny", "model_kwargs": kwargs, "num_classes": 3, "classes": ["a", "b", "c"],
            "palette": [[0, 0, 0], [1, 1, 1], [2, 2, 2]], "mean": [0.0] * 3, "std": [1.0] * 3}
    path = tmp_path / "trained.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}, META_KEY: meta}, path)
    for cached in cache_dir(tmp_path).iterdir():  # another machine: nothing cached, the server unreachable
        cached.unlink()
    del server.files[FILE]

    model, _ = load_segmentor(path)
    assert server.hits == {FILE: 1}
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
