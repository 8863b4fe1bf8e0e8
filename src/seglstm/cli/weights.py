"""``seglstm weights``: the pretrained weights a config can name, and whether each is cached here."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seglstm weights",
        description="List the weights accepted as model.model_kwargs.pretrained (or pretrained= in Python) and "
        "where they are cached, or download one ahead of time (for a machine that will be offline).",
    )
    sub = p.add_subparsers(dest="action")
    sub.add_parser("list", help="list the names (the default)")
    dl = sub.add_parser("download", help="download one name into the cache")
    dl.add_argument("name")
    dl.add_argument("--force", action="store_true", help="download a Vision-LSTM file again even when cached (timm manages its own cache)")
    dl.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _cached(name: str) -> str:
    from seglstm.models.pretrained import cached_weights

    path = cached_weights(name)
    return f"{path} ({path.stat().st_size / 2**20:.1f} MiB)" if path is not None else "not cached"


def _list() -> int:
    import timm
    import torch

    from seglstm.models.pretrained import BASE_URL_ENV, TIMM_ENCODERS, VIL_WEIGHTS, timm_weight_names

    print(f"Vision-LSTM ImageNet-1k weights (cache: {torch.hub.get_dir()}/checkpoints, base URL from ${BASE_URL_ENV})")
    for w in VIL_WEIGHTS.values():
        print(f"  {w.name}")
        print(f"    encoders: {', '.join(w.encoders)} (width {w.embed_dim}, {w.depth} blocks)")
        print(f"    source:   {w.source}, {w.url}")
        print(f"    licence:  {w.licence}")
        print(f"    cached:   {_cached(w.name)}")
    print("timm weights of the comparison encoders (Hugging Face hub cache; other tags of the same network work too)")
    for name in timm_weight_names():
        cfg = timm.models.get_pretrained_cfg(name)
        print(f"  {name}")
        print(f"    models:   {', '.join(TIMM_ENCODERS[name.split('.')[0]])}")
        print(f"    source:   timm, huggingface.co/{cfg.hf_hub_id}")
        print(f"    licence:  {cfg.license or 'not stated'}")
        print(f"    cached:   {_cached(name)}")
    return 0


def _download(name: str, force: bool, quiet: bool) -> int:
    from seglstm.models import pretrained as weights

    try:
        if name in weights.VIL_WEIGHTS:
            path = weights.fetch_weights(name, progress=not quiet, force=force)
        elif name in weights.timm_weight_names():
            from seglstm.models.timm_encoders import create_timm_model

            create_timm_model(name, pretrained=True)  # timm downloads into the Hugging Face hub cache
            path = weights.cached_weights(name)
        else:
            known = [*weights.VIL_WEIGHTS, *weights.timm_weight_names()]
            print(f"seglstm weights: error: unknown name {name!r}; known: {', '.join(known)}", file=sys.stderr)
            return 2
    except weights.PretrainedWeightsError as err:
        print(f"seglstm weights: error: {err}", file=sys.stderr)
        return 1
    print(f"{name}: {path}")
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.action == "download":
        return _download(args.name, args.force, args.quiet)
    return _list()
