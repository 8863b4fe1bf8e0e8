"""Mapping a region: many scenes into one output folder, shared out over the ranks a launcher started.

* ``expand_inputs``: files, glob patterns, ``@list.txt`` (one path or URL a line) and STAC ItemCollections
  (a JSON document with ``features``) become a sorted list of named scenes.
* ``Launch``: rank, world size and local rank from torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or from
  ``srun`` (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``); each rank runs on ``cuda:LOCAL_RANK`` when
  CUDA is used. There is no scheduler: rank 0 lists what is still to do and deals it out round-robin.
* ``run_region``: each rank segments its scenes one after the other with the single-scene
  :class:`~seglstm.inference.scene.ScenePredictor`, into ``DIR/<scene>/``, and records each one in
  ``DIR/<scene>/scene.json`` (status, seconds, pixels and area per class, outputs, or its one-line error).
  A failing scene does not stop the others. A rerun skips the scenes recorded as done and resumes a scene
  whose partial run an interrupted rank left behind.
* At the end rank 0 writes ``manifest.json`` / ``manifest.csv``, a GDAL VRT mosaic of the class rasters and,
  with a vector product, one GeoPackage of every scene's polygons with a ``scene`` column.

The ranks meet twice, over a gloo process group: once for rank 0's plan, once at the end so that rank 0
writes the region's products only after every rank has finished. Only a few small records cross (the
rasters never do), so gloo serves on GPU nodes too; a rank that dies closes its sockets and the others stop
with an error at the final meeting (their scenes are recorded; a rerun completes the rest).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import rasterio

from seglstm.inference.scene.errors import SceneError
from seglstm.inference.scene.outputs import PartialRun
from seglstm.inference.scene.predictor import ScenePredictor
from seglstm.inference.scene.source import is_remote, is_stac
from seglstm.inference.scene.vector import VectorSpec
from seglstm.inference.scene.writers import NODATA
from seglstm.utils.io import atomic_layer_path, atomic_write_text

log = logging.getLogger(__name__)

RECORD = "scene.json"
SETTINGS = "run.json"
JOIN_TIMEOUT = timedelta(minutes=30)  # how long ranks wait for each other to start
WAIT_TIMEOUT = timedelta(days=7)  # how long a finished rank waits for the slowest one
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# ------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Scene:
    """One input of a region: its folder name under the output folder and what ``open_input`` reads."""

    name: str
    href: str


def _scene_name(text: str) -> str:
    name = _UNSAFE.sub("_", text).strip("._")
    if not name:
        raise SceneError(f"input {text!r}: cannot derive a scene name from it")
    return name


def _stem(href: str) -> str:
    path = urlparse(href).path if is_remote(href) else href
    return Path(path.rstrip("/")).stem


def _read_json(href: str, what: str) -> Any:
    from seglstm.utils.optional import require

    pystac = require("pystac", "reading STAC documents")

    try:
        text = pystac.StacIO.default().read_text(href)
        return json.loads(text)
    except (OSError, ValueError, pystac.STACError) as err:
        raise SceneError(f"{what} {href} is not a readable JSON document: {err}") from err


def _absolute(href: str, base: str) -> str:
    """An asset's href made absolute against the document that names it (a URL or a local file)."""
    if is_remote(href) or os.path.isabs(href):
        return href
    if is_remote(base):
        return urljoin(base, href)
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(base)), href))


def _collection_scenes(href: str, doc: dict, stac_dir: Path) -> list[Scene]:
    """Each item of an ItemCollection: its own ``self`` href when it has an absolute one, else a copy
    under ``stac_dir`` with its asset hrefs made absolute against the collection."""
    scenes = []
    for i, item in enumerate(doc.get("features") or []):
        if not isinstance(item, dict) or not item.get("id") or not isinstance(item.get("assets"), dict):
            raise SceneError(
                f"STAC ItemCollection {href}: feature {i} is not a STAC item (needs id and assets)"
            )
        name = _scene_name(str(item["id"]))
        self_href = next((ln.get("href") for ln in item.get("links", []) if ln.get("rel") == "self"), None)
        if self_href and (is_remote(self_href) or os.path.isabs(self_href)):
            scenes.append(Scene(name, self_href))
            continue
        assets = {}
        for key, asset in item["assets"].items():
            target = _absolute(str(asset.get("href", "")), href)
            if is_remote(href) and (not is_remote(target) or target.lower().startswith("file:")):
                raise SceneError(
                    f"STAC ItemCollection {href}: item {item['id']} asset {key} points at the local file "
                    f"{target}; a remote collection may only name remote assets"
                )
            assets[key] = {**asset, "href": target}
        copy = stac_dir / f"{name}.json"
        links = [ln for ln in item.get("links", []) if ln.get("rel") != "self"]
        atomic_write_text(copy, json.dumps({**item, "assets": assets, "links": links}, indent=1))
        scenes.append(Scene(name, str(copy)))
    return scenes


def _expand_one(token: str, stac_dir: Path, where: str) -> list[Scene]:
    if not is_remote(token) and glob.has_magic(token):
        matches = sorted(glob.glob(token))
        if not matches:
            raise SceneError(f"{where}: pattern {token!r} matches no file")
        return [s for m in matches for s in _expand_one(m, stac_dir, where)]
    if is_stac(token) and (is_remote(token) or Path(token).is_file()):
        doc = _read_json(token, where)
        if isinstance(doc, dict) and "features" in doc:
            return _collection_scenes(token, doc, stac_dir)
        if isinstance(doc, dict) and doc.get("id"):
            return [Scene(_scene_name(str(doc["id"])), token)]
    return [Scene(_scene_name(_stem(token)), token)]


def expand_inputs(tokens: Sequence[str], out_dir: Path) -> list[Scene]:
    """The scenes named by ``tokens``, sorted by name: files and URLs, glob patterns, ``@LIST`` (a text file
    with one input a line; blank lines and ``#`` comments skipped) and STAC ItemCollections (JSON with
    ``features``; each item is one scene, named by its id). Two inputs with one name are refused."""
    scenes: list[Scene] = []
    stac_dir = out_dir / ".stac"
    for token in tokens:
        if token.startswith("@"):
            listing = Path(token[1:])
            try:
                lines = listing.read_text().splitlines()
            except OSError as err:
                raise SceneError(f"input list {token}: cannot read {listing}: {err.strerror}") from err
            for n, line in enumerate(lines, 1):
                line = line.strip()
                if line and not line.startswith("#"):
                    scenes += _expand_one(line, stac_dir, f"input list {listing} line {n}")
        else:
            scenes += _expand_one(token, stac_dir, "input")
    if not scenes:
        raise SceneError("no input scenes given")
    by_name: dict[str, Scene] = {}
    for scene in scenes:
        other = by_name.setdefault(scene.name, scene)
        if other.href != scene.href:
            raise SceneError(
                f"inputs {other.href} and {scene.href} would both write {out_dir / scene.name}; rename one of them"
            )
    return sorted(by_name.values(), key=lambda s: s.name)


# ------------------------------------------------------------------------------------------- launch
@dataclass(frozen=True)
class Launch:
    """This process's place among the ranks a launcher started (one rank when there is no launcher)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Launch:
        """torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, else ``srun``'s ``SLURM_PROCID``/``SLURM_NTASKS``/
        ``SLURM_LOCALID`` (not in an interactive job named ``bash`` or ``interactive``, as Lightning)."""
        env = os.environ if env is None else env
        keys = None
        if "RANK" in env and "WORLD_SIZE" in env:
            keys, launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK"), "torchrun"
        elif (
            "SLURM_PROCID" in env
            and "SLURM_NTASKS" in env
            and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")
        ):
            keys, launcher = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"), "slurm"
        if keys is None:
            return cls()
        try:
            rank, world, local = (int(env.get(k, "0")) for k in keys)
        except ValueError as err:
            raise SceneError(f"launcher environment {', '.join(keys)}: not integers ({err})") from err
        if not 0 <= rank < world or local < 0:
            raise SceneError(f"launcher environment: rank {rank} is outside world size {world}")
        return cls(rank, world, local, launcher)

    def device(self, requested: str) -> str:
        """``auto``/``cuda`` become this rank's GPU, ``cuda:LOCAL_RANK`` (modulo the GPUs it sees), when
        CUDA is available; anything else is kept."""
        import torch

        if requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested


class _Group:
    """The two meetings of the ranks (a plan from rank 0, the records at the end); nothing for one rank."""

    def __init__(self, launch: Launch) -> None:
        self.launch = launch
        if launch.world_size == 1:
            return
        import torch.distributed as dist

        from seglstm.utils.distributed import restart_scoped_store

        store = restart_scoped_store(JOIN_TIMEOUT)
        if store is None:  # no torchrun agent store: rank 0 serves one at MASTER_ADDR:MASTER_PORT
            if launch.launcher == "slurm" and "MASTER_ADDR" not in os.environ:
                from lightning.fabric.plugins.environments import SLURMEnvironment

                # the address and port fit uses under SLURM: the first node, 15000 + the job id's last 4 digits
                nodes = os.environ.get("SLURM_NODELIST", "127.0.0.1")
                os.environ["MASTER_ADDR"] = SLURMEnvironment.resolve_root_node_address(nodes)
                job = os.environ.get("SLURM_JOB_ID", "")
                os.environ.setdefault("MASTER_PORT", str(15000 + int(job[-4:])) if job.isdigit() else "12910")
            try:
                addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
            except (KeyError, ValueError) as err:
                raise SceneError(
                    f"rank {launch.rank} of {launch.world_size}: MASTER_ADDR and MASTER_PORT must name rank 0's "
                    "host and a free port, as torchrun sets them"
                ) from err
            try:
                store = dist.TCPStore(addr, port, launch.world_size, is_master=launch.rank == 0,
                                      timeout=JOIN_TIMEOUT, wait_for_workers=True)  # fmt: skip
            except RuntimeError as err:  # a port in use, an unreachable host, ranks that never came
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise SceneError(
                    f"rank {launch.rank} of {launch.world_size}: could not meet the other ranks at {addr}:{port} "
                    f"({first}); start every rank with torchrun, or with srun (one task per GPU)"
                ) from err
        dist.init_process_group("gloo", store=store, rank=launch.rank, world_size=launch.world_size,
                                timeout=WAIT_TIMEOUT)  # fmt: skip

    def broadcast(self, obj: Any) -> Any:
        if self.launch.world_size == 1:
            return obj
        box = [obj]
        self._collective("broadcast_object_list", box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list:
        if self.launch.world_size == 1:
            return [obj]
        out: list = [None] * self.launch.world_size
        self._collective("all_gather_object", out, obj)
        return out

    def _collective(self, name: str, *args: Any, **kwargs: Any) -> None:
        import torch.distributed as dist

        try:
            getattr(dist, name)(*args, **kwargs)
        except RuntimeError as err:  # gloo: a peer that died closed its sockets
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise SceneError(
                f"rank {self.launch.rank}: another rank stopped before the end ({first[:200]}); every finished "
                "scene is recorded: rerun the same command to complete the region"
            ) from err

    def close(self) -> None:
        if self.launch.world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class SceneOutputs:
    """File names written inside each scene's folder (None: not asked for)."""

    classes: str = "classes.tif"
    probs: str | None = None
    preview: str | None = None
    vector: VectorSpec | None = None

    def check(self) -> None:
        names = [
            self.classes,
            self.probs,
            self.preview,
            None if self.vector is None else str(self.vector.path),
        ]
        given = [n for n in names if n is not None]
        for name in given:
            if Path(name).name != name or name.startswith("."):
                raise SceneError(
                    f"with --out-dir, --probs/--preview/--vector are file names inside each scene's folder, "
                    f"got {name!r}: use a plain name such as {Path(name).name.lstrip('.') or 'out.tif'}"
                )
        if len(set(given)) != len(given):
            raise SceneError(f"with --out-dir, each scene's products need different names, got {given}")


@dataclass
class SceneRecord:
    """What one scene's run left: the manifest's row, kept in ``DIR/<scene>/scene.json``."""

    name: str
    input: str
    status: str  # ok or failed
    settings: str
    seconds: float = 0.0
    rank: int = 0
    device: str = ""
    error: str | None = None
    height: int = 0
    width: int = 0
    tiles: int = 0
    resumed_from_tile: int = 0
    pixels: int = 0
    crs: str | None = None
    pixel_area: float | None = None
    class_pixels: dict[str, int] = field(default_factory=dict)
    class_area: dict[str, float] | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    polygons: int | None = None

    @classmethod
    def load(cls, path: Path) -> SceneRecord | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def done(self, out_dir: Path, settings: str) -> bool:
        """Whether a rerun can skip the scene: finished with these settings and every product still there."""
        return (self.status == "ok" and self.settings == settings
                and all((out_dir / p).is_file() for p in self.outputs.values()))  # fmt: skip


def class_pixels(raster: Path, num_classes: int) -> tuple[np.ndarray, float | None, str | None]:
    """Pixels per class of a class raster (read block by block), its pixel area in map units² (None for a
    scene without a CRS or on GCPs) and its CRS."""
    counts = np.zeros(NODATA + 1, np.int64)
    with rasterio.open(raster) as src:
        for _, window in src.block_windows(1):
            counts += np.bincount(src.read(1, window=window).ravel(), minlength=NODATA + 1)
        georeferenced = src.crs is not None and not src.gcps[0]
        area = abs(src.transform.determinant) if georeferenced else None
        crs = None if src.crs is None else src.crs.to_string()
    return counts[:num_classes], area, crs


def settings_digest(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- running
def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, SceneError) else f"{type(err).__name__}: {text}"


def _run_scene(
    predictor: ScenePredictor,
    scene: Scene,
    out_dir: Path,
    outputs: SceneOutputs,
    predict_kw: Mapping[str, Any],
    settings: str,
    rank: int,
) -> SceneRecord:
    folder = out_dir / scene.name
    classes = folder / outputs.classes
    record = SceneRecord(scene.name, scene.href, "failed", settings, rank=rank, device=str(predictor.device))
    started = time.perf_counter()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        vector = (
            None if outputs.vector is None else replace(outputs.vector, path=folder / outputs.vector.path)
        )
        resume = PartialRun(classes, {}).sidecar.is_file()  # an interrupted run of this scene: continue it
        result = predictor.predict(
            scene.href, classes, resume=resume, vector=vector,
            probs_path=None if outputs.probs is None else folder / outputs.probs,
            preview_path=None if outputs.preview is None else folder / outputs.preview, **predict_kw,
        )  # fmt: skip
        counts, area, crs = class_pixels(classes, predictor.num_classes)
        products = {"classes": result.output, "probs": result.probs, "preview": result.preview,
                    "vector": result.vector}  # fmt: skip
        record = replace(
            record, status="ok", height=result.height, width=result.width, tiles=result.tiles,
            resumed_from_tile=result.resumed_from_tile, pixels=int(counts.sum()), crs=crs, pixel_area=area,
            class_pixels={c: int(n) for c, n in zip(predictor.classes, counts)},
            class_area=None if area is None else {c: float(n) * area for c, n in zip(predictor.classes, counts)},
            outputs={k: str(Path(p).relative_to(out_dir)) for k, p in products.items() if p is not None},
            polygons=result.polygons if result.vector else None,
        )  # fmt: skip
    except Exception as err:  # any failure of one scene is recorded and the others go on
        record.error = _one_line(err)
        log.error("scene %s (%s) failed: %s", scene.name, scene.href, record.error)
    record.seconds = round(time.perf_counter() - started, 3)
    atomic_write_text(folder / RECORD, json.dumps(asdict(record), indent=1))
    return record


def _check_settings(out_dir: Path, settings: Mapping[str, Any]) -> None:
    """Refuse to mix two runs with different settings in one folder (done scenes would be skipped)."""
    path = out_dir / SETTINGS
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError as err:
            raise SceneError(f"{path} is unreadable ({err}); remove it to start the region over") from err
        new = json.loads(json.dumps(dict(settings), default=str))
        changed = sorted(k for k in new.keys() | old.keys() if new.get(k) != old.get(k))
        if changed:
            raise SceneError(
                f"--out-dir {out_dir} holds a run made with different {', '.join(changed)}; rerun with the "
                "original settings to complete it, or choose another --out-dir"
            )
    else:
        atomic_write_text(path, json.dumps(dict(settings), indent=1, sort_keys=True, default=str))


def _plan(tokens: Sequence[str], out_dir: Path, settings: Mapping[str, Any], world: int) -> dict:
    """Rank 0's plan: every scene, and the ones still to do dealt round-robin (in name order) to the ranks."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scenes = expand_inputs(tokens, out_dir)
    _check_settings(out_dir, settings)
    digest = settings_digest(settings)
    todo = [s for s in scenes
            if not ((r := SceneRecord.load(out_dir / s.name / RECORD)) and r.done(out_dir, digest))]  # fmt: skip
    return {"scenes": scenes, "assigned": [todo[r::world] for r in range(world)], "settings": digest}


@dataclass(frozen=True)
class RegionResult:
    """What a region run did, as every rank sees it at the end."""

    records: list[SceneRecord]
    ran: int
    manifest: Path | None

    @property
    def failed(self) -> list[SceneRecord]:
        return [r for r in self.records if r.status != "ok"]


def run_region(
    predictor: ScenePredictor,
    inputs: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    outputs: SceneOutputs = SceneOutputs(),
    predict_kw: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    launch: Launch | None = None,
) -> RegionResult:
    """Segment every scene named by ``inputs`` into ``out_dir/<scene>/``; this rank takes its share.

    Args:
        predictor: this rank's predictor (on this rank's device, see :meth:`Launch.device`).
        inputs: files, URLs, glob patterns, ``@LIST`` files and STAC ItemCollections (:func:`expand_inputs`).
        outputs: file names inside each scene's folder; the vector's name also names the merged layer.
        predict_kw: further :meth:`ScenePredictor.predict` keywords (bands, scale, cog, input_options, ...).
        settings: what must not change between a run and its rerun (the model, tiling, products); the model's
            digest is added here. A folder made with other settings is refused.
        launch: this rank's place (default: from the environment, :meth:`Launch.from_env`).

    Returns:
        Every scene's record; rank 0 has also written the manifest, the VRT and the merged polygons.
    """
    out_dir, launch = Path(out_dir), launch or Launch.from_env()
    outputs.check()
    settings = {
        **(settings or {}),
        "classes": predictor.classes,
        "model": predictor.model_digest(),  # cached: the scenes reuse it
        "tile": predictor.tile,
        "overlap": predictor.overlap,
        "outputs": asdict(outputs),
    }
    group = _Group(launch)
    try:
        plan: dict | str
        if launch.rank == 0:
            try:
                plan = _plan(inputs, out_dir, settings, launch.world_size)
            except SceneError as err:
                plan = str(err)
        else:
            plan = None
        plan = group.broadcast(plan)
        if isinstance(plan, str):
            raise SceneError(plan)
        mine = plan["assigned"][launch.rank]
        total = sum(len(a) for a in plan["assigned"])
        if launch.rank == 0:
            log.info("%d scene(s), %d done before, %d to run on %d rank(s)", len(plan["scenes"]),
                     len(plan["scenes"]) - total, total, launch.world_size)  # fmt: skip
        for i, scene in enumerate(mine, 1):
            record = _run_scene(
                predictor, scene, out_dir, outputs, predict_kw or {}, plan["settings"], launch.rank
            )
            log.info("rank %d scene %d/%d %s: %s, %.1f s", launch.rank, i, len(mine), scene.name, record.status,
                     record.seconds)  # fmt: skip
        group.gather(len(mine))  # everyone has finished: every record is on disk
        records = [SceneRecord.load(out_dir / s.name / RECORD) for s in plan["scenes"]]
        records = [r or SceneRecord(s.name, s.href, "failed", plan["settings"], error="no record was written")
                   for r, s in zip(records, plan["scenes"])]  # fmt: skip
        manifest = None
        if launch.rank == 0:
            manifest = finish_region(out_dir, records, predictor.classes, predictor.palette, outputs)
        group.gather(None)  # the others return once the region's products exist
        return RegionResult(records, total, manifest)
    finally:
        group.close()


# ------------------------------------------------------------------------------------------ products
def finish_region(
    out_dir: Path,
    records: Sequence[SceneRecord],
    classes: Sequence[str],
    palette: Sequence[Sequence[int]],
    outputs: SceneOutputs,
) -> Path:
    """The manifest (JSON and CSV), the VRT mosaic and the merged polygons, each written atomically."""
    ok = [r for r in records if r.status == "ok"]
    crss = sorted({r.crs for r in ok if r.crs and r.pixel_area is not None})
    placed = [r for r in ok if r.crs and r.pixel_area is not None]
    mosaic, mosaic_note, written = out_dir / "mosaic.vrt", None, False
    if len(crss) > 1:
        mosaic_note = (f"no mosaic: the scenes are in {len(crss)} CRSs ({', '.join(crss)}); rerun into a new "
                       "--out-dir with --dst-crs to put them in one")  # fmt: skip
    elif not placed:
        mosaic_note = "no mosaic: no finished scene has a CRS and a geotransform"
    else:
        try:
            write_vrt(mosaic, [out_dir / r.outputs["classes"] for r in placed], classes, palette)
            written = True
        except SceneError as err:
            mosaic_note = f"no {err}"
        else:
            if len(placed) < len(ok):
                mosaic_note = f"{len(ok) - len(placed)} scene(s) without a CRS or on GCPs are not in the mosaic"
    merged, vector_note = None, None
    if outputs.vector is not None:
        layers = [(r.name, out_dir / r.outputs["vector"]) for r in ok if "vector" in r.outputs]
        merged = out_dir / f"{outputs.vector.path.stem}.gpkg"
        try:
            merge_vectors(merged, layers)
        except SceneError as err:
            vector_note = str(err)
            merged.unlink(missing_ok=True)  # an earlier run's layer would no longer match the manifest
            merged = None
    if not written:  # an earlier run's mosaic would no longer match the manifest
        mosaic.unlink(missing_ok=True)
        mosaic = None
    for note in filter(None, (mosaic_note, vector_note)):
        log.warning("%s", note)
    totals = {c: sum(r.class_pixels.get(c, 0) for r in ok) for c in classes}
    summary = {
        "scenes": len(records), "ok": len(ok), "failed": len(records) - len(ok),
        "seconds": round(sum(r.seconds for r in records), 3), "pixels": sum(r.pixels for r in ok),
        "class_pixels": totals,
        "class_area": ({c: sum(r.class_area[c] for r in ok if r.class_area) for c in classes}
                       if len(crss) == 1 and len(placed) == len(ok) else None),
        "crs": crss[0] if len(crss) == 1 else None,
        "mosaic": None if mosaic is None else mosaic.name, "mosaic_note": mosaic_note,
        "vector": None if merged is None else merged.name, "vector_note": vector_note,
    }  # fmt: skip
    manifest = out_dir / "manifest.json"
    atomic_write_text(
        manifest, json.dumps({"summary": summary, "scenes": [asdict(r) for r in records]}, indent=1)
    )
    atomic_write_text(out_dir / "manifest.csv", _manifest_csv(records, classes))
    return manifest


def _manifest_csv(records: Sequence[SceneRecord], classes: Sequence[str]) -> str:
    head = ["scene", "input", "status", "seconds", "height", "width", "pixels", "pixel_area", "crs"]
    head += [f"pixels_{c}" for c in classes] + [f"area_{c}" for c in classes]
    head += ["classes", "probs", "preview", "vector", "polygons", "error"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(head)
    for r in records:
        area = r.class_area or {}
        writer.writerow([r.name, r.input, r.status, r.seconds, r.height, r.width, r.pixels, r.pixel_area, r.crs]
                        + [r.class_pixels.get(c, "") for c in classes] + [area.get(c, "") for c in classes]
                        + [r.outputs.get(k, "") for k in ("classes", "probs", "preview", "vector")]
                        + [r.polygons, r.error or ""])  # fmt: skip
    return buf.getvalue()


def write_vrt(
    path: Path, rasters: Sequence[Path], classes: Sequence[str], palette: Sequence[Sequence[int]]
) -> None:
    """A GDAL VRT mosaic of north-up class rasters in one CRS, at the finest pixel size among them.

    Each raster is a ``ComplexSource`` whose nodata (255) is transparent, so where scenes overlap a later
    scene (in name order) shows through only where it has data; sources are referenced relative to the VRT.
    """
    infos = []
    for raster in rasters:
        with rasterio.open(raster) as src:
            t = src.transform
            if t.b or t.d or t.e >= 0:
                raise SceneError(
                    f"mosaic: {raster} is not north-up (transform {tuple(t)[:6]}); cannot mosaic it"
                )
            infos.append((raster, src.crs, t, src.width, src.height))
    crs = infos[0][1]
    res_x, res_y = min(t.a for _, _, t, _, _ in infos), min(-t.e for _, _, t, _, _ in infos)
    x0 = min(t.c for _, _, t, _, _ in infos)
    y0 = max(t.f for _, _, t, _, _ in infos)
    x1 = max(t.c + w * t.a for _, _, t, w, _ in infos)
    y1 = min(t.f + h * t.e for _, _, t, _, h in infos)
    width, height = math.ceil((x1 - x0) / res_x - 1e-6), math.ceil((y0 - y1) / res_y - 1e-6)
    lut = [(*palette[i], 255) if i < len(palette) else (0, 0, 0, 0) for i in range(NODATA + 1)]
    lines = [
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
        f"  <SRS>{escape(crs.to_wkt())}</SRS>",
        f"  <GeoTransform>{x0!r}, {res_x!r}, 0.0, {y0!r}, 0.0, {-res_y!r}</GeoTransform>",
        '  <VRTRasterBand dataType="Byte" band="1">',
        f"    <NoDataValue>{NODATA}</NoDataValue>",
        "    <ColorInterp>Palette</ColorInterp>",
        "    <CategoryNames>",
        *[f"      <Category>{escape(str(c))}</Category>" for c in classes],
        "    </CategoryNames>",
        "    <ColorTable>",
        *[f'      <Entry c1="{r}" c2="{g}" c3="{b}" c4="{a}"/>' for r, g, b, a in lut],
        "    </ColorTable>",
    ]
    for raster, _, t, w, h in infos:
        rel = os.path.relpath(raster, path.parent)
        lines += [
            "    <ComplexSource>",
            f'      <SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>',
            "      <SourceBand>1</SourceBand>",
            f'      <SourceProperties RasterXSize="{w}" RasterYSize="{h}" DataType="Byte" BlockXSize="256" '
            'BlockYSize="256"/>',
            f'      <SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>',
            f"      <DstRect xOff={quoteattr(repr((t.c - x0) / res_x))} yOff={quoteattr(repr((y0 - t.f) / res_y))} "
            f"xSize={quoteattr(repr(w * t.a / res_x))} ySize={quoteattr(repr(h * -t.e / res_y))}/>",
            f"      <NODATA>{NODATA}</NODATA>",
            "    </ComplexSource>",
        ]
    lines += ["  </VRTRasterBand>", "</VRTDataset>", ""]
    atomic_write_text(path, "\n".join(lines))


def merge_vectors(path: Path, layers: Sequence[tuple[str, Path]], batch: int = 100_000) -> int:
    """Every scene's polygons in one GeoPackage layer with a ``scene`` column; returns the polygon count.
    Layers are copied ``batch`` features at a time, so memory holds one batch, not the region."""
    import pyogrio.raw

    if not layers:
        raise SceneError("no merged polygons: no finished scene has a polygon layer")
    metas = [(name, layer, pyogrio.read_info(layer)) for name, layer in layers]
    crss = {m["crs"] for _, _, m in metas}
    if len(crss) > 1:
        raise SceneError(f"no merged polygons: the scenes' layers are in {len(crss)} CRSs; use --dst-crs to put "
                         "them in one")  # fmt: skip
    count, created = 0, False
    with atomic_layer_path(path) as work:
        for name, layer, meta in metas:
            for skip in range(0, max(meta["features"], 1), batch):
                _, _, geoms, values = pyogrio.raw.read(layer, skip_features=skip, max_features=batch)
                if not len(geoms) and created:
                    continue
                pyogrio.raw.write(
                    work, geoms, [*values, np.full(len(geoms), name, dtype=object)],
                    fields=[*meta["fields"], "scene"], layer=path.stem, driver="GPKG",
                    geometry_type=meta["geometry_type"], crs=meta["crs"], append=created,
                )  # fmt: skip
                count, created = count + len(geoms), True
    return count
