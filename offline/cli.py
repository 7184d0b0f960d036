"""`python -m offline <stage>`: one subcommand per stage, and `build` to run them in order.

Every stage is idempotent: run twice with the same inputs, the second run reuses the outputs.
`main(argv)` returns an exit code instead of exiting, so tests call it directly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("offline")

DESCRIPTION = """\
Build, measure and fill the search engine, one stage a subcommand (`build` runs them in order).
Every stage reuses what an earlier run with the same inputs made (--force: make it again), and an
interrupted stage resumes where it stopped. Run `STAGE --help` for a stage's options.
"""
DEFAULT_OUT = Path("artifacts")
DEFAULT_DATA = Path("data/flickr8k")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="artifacts folder every stage reads from and writes to (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch/faiss CPU threads; 0 = all cores (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="recompute even if outputs are up to date")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_data(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data", type=Path, required=required, default=None if required else None,
                   help="dataset: a folder in the original Flickr8k layout (Flicker8k_Dataset/ or Images/ "
                        "+ Flickr8k.token.txt + split lists) or the Kaggle layout (Images/ + captions.txt), "
                        "or a .jsonl/.csv file of {image, caption} records")
    p.add_argument("--split", choices=("official", "random"), default="official",
                   help="how to split images into train/val/test (default: %(default)s)")
    p.add_argument("--ratios", default="0.7,0.15,0.15",
                   help="train,val,test image fractions for --split random (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for --split random (default: %(default)s)")


def _add_model(p: argparse.ArgumentParser) -> None:
    from clipsearch.models import DEFAULT_MODEL, DEFAULT_PRETRAINED

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="open_clip model name, or lit-effnet1-minilm (the offline model; lit-effnet-minilm, its "
                        "Lite0 predecessor, still builds) (default: %(default)s)")
    p.add_argument("--pretrained", default=None,
                   help="open_clip pretrained tag (downloads), a local checkpoint file, or 'none' for "
                        f"random weights (default: {DEFAULT_PRETRAINED}; for an offline model, the "
                        "checkpoint that build trains into <out>/models/)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default: %(default)s)")
    p.add_argument("--image-tta", choices=("auto", "none", "mirror"), default="auto",
                   help="embed every image as the mean of it and its horizontal mirror ('mirror', twice the "
                        "image compute), or not ('none'); 'auto' = mirror for the offline models, where it was "
                        "chosen on val (docs/offline_model.md), none otherwise (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="encoding batch size (default: %(default)s)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="DataLoader worker processes decoding JPEGs beside the forward pass (default: cores "
                        "- 2, at most 4, here %(default)s: on 2 cores the encoder's threads already use both "
                        "and workers only compete with them; benchmarks/bench_embed.py measures it)")


def _add_eval_split(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-split", default="test", choices=("train", "val", "test"),
                   help="which split to embed, index and evaluate (default: %(default)s)")


def default_workers() -> int:
    """Decoding workers only pay off on cores the encoder's own threads leave free."""
    return max(0, min(4, (os.cpu_count() or 1) - 2))


def _add_backends(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-backend", choices=("auto", "onnx", "bf16", "torch"), default="auto",
                   help="image encoder: onnx = ONNX Runtime export of a timm or ViT image tower (self-checked "
                        "against torch, cached in <out>/onnx; other towers use torch); bf16 = a bf16 copy of "
                        "the image tower (self-checked, else onnx); auto = bf16 for a ViT tower on a CPU with "
                        "AMX-BF16, else onnx; torch = eager fp32 (default: %(default)s)")
    p.add_argument("--text-backend", choices=("onnx", "torch"), default="onnx",
                   help="text encoder for embed: ONNX Runtime export of the text tower (self-checked "
                        "against torch, cached in <out>/onnx; torch when it cannot be exported) or torch "
                        "(default: %(default)s)")


def _add_index(p: argparse.ArgumentParser) -> None:
    p.add_argument("--m", type=int, default=16, help="HNSW M (default: %(default)s)")
    p.add_argument("--ef-construction", type=int, default=200, help="HNSW efConstruction (default: %(default)s)")
    p.add_argument("--ef-search", type=int, default=100, help="HNSW efSearch (default: %(default)s)")
    p.add_argument("--no-sweep", action="store_true", help="skip the efSearch sweep and its plot")
    p.add_argument("--no-hubness", action="store_true",
                   help="build plain caption indexes even when the hubness stage chose a correction")


def _add_hubness(p: argparse.ArgumentParser) -> None:
    from offline.hubness import DEFAULT_BANK, DEFAULT_SELECT, K_GRID

    p.add_argument("--bank-split", default=DEFAULT_BANK, choices=("train", "val", "test"),
                   help="split whose images form the query bank (default: %(default)s)")
    p.add_argument("--select-split", default=DEFAULT_SELECT, choices=("train", "val", "test"),
                   help="split on which beta is chosen (default: %(default)s)")
    p.add_argument("--hub-k", type=_ints, default=K_GRID,
                   help="the k tried (comma-separated): nearest bank vectors averaged per gallery vector "
                        "(default: %s)" % ",".join(map(str, K_GRID)))


def _add_ingest(p: argparse.ArgumentParser, source: bool = True) -> None:
    if source:
        p.add_argument("source", type=Path,
                       help="a folder of images (recursive; captions optional, a sidecar NAME.txt beside "
                            "NAME.jpg holds them, one a line), a .jsonl/.csv of records with 'image' and "
                            "optional 'caption' (other fields become metadata), or a Flickr8k folder")
    p.add_argument("--collection", default=None,
                   help="collection name (default: the source's folder or file name)")


def _store_spec(text: str) -> str:
    from clipsearch.store import check_store_spec

    try:
        return check_store_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_store(p: argparse.ArgumentParser, flag: str, help: str, required: bool = False) -> None:
    p.add_argument(flag, dest="store", type=_store_spec, required=required,
                   default=None if required else "faiss", help=help + ("" if required else " (default: %(default)s)"))
    p.add_argument("--api-key", default=os.environ.get("CLIPSEARCH_QDRANT_API_KEY"),
                   help="Qdrant API key (default: $CLIPSEARCH_QDRANT_API_KEY)")


def build_parser(prog: str = "python -m offline") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")

    p = sub.add_parser("prepare", help="validate a dataset and write image-disjoint splits (JSONL)")
    _add_common(p)
    _add_data(p, required=True)

    p = sub.add_parser("ingest", help="add a photo folder, a record file or Flickr8k to a collection "
                                      "(incremental: only new and changed files are embedded)")
    _add_common(p)
    _add_ingest(p)
    _add_model(p)
    p.set_defaults(model=None)  # default: the model this project built (<out>/model.json)
    # images decoded per step: ~0.7 MB of pixels each, a few steps in flight; the ONNX image tower runs
    # them in slices of 4 anyway, so a larger batch costs memory and buys no speed (docs/ingest_memory.md)
    p.set_defaults(batch_size=32)
    _add_backends(p)
    _add_index(p)
    _add_store(p, "--store", "where the collection is served from: faiss (the embedded store, default), a "
                             "Qdrant URL (http://host:6333) or qdrant:PATH (local mode); for Qdrant the "
                             "catalog under --out is ingested first, then copied there (offline migrate)")

    p = sub.add_parser("migrate", help="copy a collection (catalog: vectors, captions, offsets, metadata, model) "
                                       "to a Qdrant store without re-embedding; idempotent")
    _add_common(p)
    p.add_argument("--collection", required=True, help="the collection under --out to copy")
    _add_store(p, "--to", "the Qdrant store: a URL (http://host:6333) or qdrant:PATH (local mode)", required=True)
    p.add_argument("--m", type=int, default=16, help="HNSW m of a new Qdrant collection (default: %(default)s)")
    p.add_argument("--ef-construction", type=int, default=200,
                   help="HNSW ef_construct of a new Qdrant collection (default: %(default)s)")
    p.add_argument("--ef-search", type=int, default=100, help="hnsw_ef at search (default: %(default)s)")
    p.add_argument("--shards", type=int, default=None, help="shard_number of a new collection on a cluster")
    p.add_argument("--replicas", type=int, default=None,
                   help="replication_factor of a new collection on a cluster (2: one node may die)")

    from offline import keys
    keys.add_parser(sub)  # keys add|list|revoke: the service's API keys

    p = sub.add_parser("download", help="download and unpack the public Flickr8k archives")
    p.add_argument("--dest", type=Path, default=DEFAULT_DATA, help="where to put the data (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="download again even if present")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    p = sub.add_parser("embed", help="embed a split's images and captions")
    _add_common(p)
    _add_model(p)
    _add_eval_split(p)
    _add_backends(p)

    p = sub.add_parser("index", help="build HNSW + exact indexes and run the efSearch sweep")
    _add_common(p)
    _add_eval_split(p)
    _add_index(p)

    p = sub.add_parser("evaluate", help="Recall@K both directions, exact and through HNSW")
    _add_common(p)
    _add_eval_split(p)

    p = sub.add_parser("hubness", help="choose both hubness corrections on val: image → caption (bank: train "
                                       "images) and text → image (bank: train captions)")
    _add_common(p)
    _add_model(p)
    _add_backends(p)
    _add_hubness(p)

    p = sub.add_parser("finetune", help="contrastive fine-tuning on the train split, selected on val")
    _add_common(p)
    _add_model(p)
    from offline import finetune

    finetune.add_arguments(p)

    p = sub.add_parser("build", help="prepare → (finetune) → embed → hubness → index → evaluate → ingest "
                                     "the whole dataset as a collection")
    _add_common(p)
    _add_data(p, required=False)
    _add_ingest(p, source=False)
    p.add_argument("--no-ingest", action="store_true", help="build and evaluate the model only")
    p.add_argument("--download", action="store_true",
                   help="download Flickr8k into --data (default data/flickr8k) if it is not there")
    _add_model(p)
    _add_eval_split(p)
    _add_backends(p)
    _add_index(p)
    _add_hubness(p)
    from offline import watch  # `watch DIR`: offline/watch.py
    watch.add_parser(sub, (_add_common, _add_model, _add_backends, _add_index))
    return parser


def _setup(args: argparse.Namespace) -> None:
    verbose = getattr(args, "verbose", False)
    # Our stages speak at INFO (headings, what was skipped and why); libraries only when something is
    # wrong: open_clip logs its model-building steps on the root logger, ONNX fusion every pass.
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    for ours in ("offline", "clipsearch"):
        logging.getLogger(ours).setLevel(logging.DEBUG if verbose else logging.INFO)
    threads = getattr(args, "threads", 0) or os.cpu_count() or 1
    import faiss
    import torch

    # explicit thread counts: torch and faiss each default to all cores and oversubscribe together
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def _ints(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def _ratios(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise ValueError(f"--ratios must be three comma-separated numbers, got {text!r}")
    return parts  # type: ignore[return-value]


def offline_checkpoint(out: Path, model: str | None = None) -> Path:
    """Where `build` trains an offline model's checkpoint (`offline.finetune.train_offline_model`)."""
    from clipsearch.artifacts import ArtifactLayout
    from offline.finetune import offline_run_name

    return ArtifactLayout(out).models_dir / f"{offline_run_name(model=model)}.pt"


def _pretrained(args: argparse.Namespace) -> str | None:
    """The weights a stage uses when --pretrained is not given."""
    from clipsearch.models import DEFAULT_PRETRAINED, is_offline_model

    if args.pretrained is not None:
        return args.pretrained
    if is_offline_model(args.model):
        ckpt = offline_checkpoint(args.out, args.model)
        if args.command == "finetune":
            return None  # start from the pretrained towers and fresh heads
        if ckpt.is_file():
            return str(ckpt)
        log.warning("no trained %s checkpoint in %s: using untrained projection heads "
                    "(run `python -m offline build` to train them)", args.model, ckpt.parent)
        return None
    return DEFAULT_PRETRAINED


def image_tta(args: argparse.Namespace) -> str | None:
    """The --image-tta choice, with 'auto' resolved for the model."""
    from clipsearch.models import default_image_tta

    choice = getattr(args, "image_tta", "auto")
    return default_image_tta(args.model) if choice == "auto" else (None if choice == "none" else choice)


def _load(args: argparse.Namespace):
    from clipsearch.models import load_model

    return load_model(args.model, _pretrained(args), args.device, image_tta=image_tta(args))


def run_prepare(args: argparse.Namespace) -> dict[str, Any]:
    from offline.data import prepare

    return prepare(args.data, args.out, split=args.split, ratios=_ratios(args.ratios), seed=args.seed,
                   force=args.force, workers=max(1, args.threads or os.cpu_count() or 1))


def run_download(args: argparse.Namespace) -> dict[str, Any]:
    from offline.download import download

    return {"data": str(download(args.dest, force=args.force))}


def run_embed(args: argparse.Namespace, loaded=None) -> dict[str, Any]:
    from offline.embed import embed

    loaded = loaded or _load(args)
    return embed(args.out, args.eval_split, loaded, batch_size=args.batch_size, workers=args.workers,
                 force=args.force, image_backend=getattr(args, "image_backend", "auto"),
                 text_backend=getattr(args, "text_backend", "onnx"))


def run_index(args: argparse.Namespace) -> dict[str, Any]:
    from clipsearch.index import IndexParams
    from offline.index import build_indexes

    params = IndexParams("hnsw", args.m, args.ef_construction, args.ef_search)
    res = build_indexes(args.out, args.eval_split, params, force=args.force, sweep=not args.no_sweep,
                        hubness=not args.no_hubness)
    if "sweep" in res:
        for row in res["sweep"]["rows"]:
            if row["ef_search"] == args.ef_search:
                log.info("HNSW %s efSearch=%d: recall@10 vs exact %.4f, %.3f ms/query", row["index"],
                         row["ef_search"], row.get("recall@10", float("nan")), row["ms_per_query"])
        res["sweep"] = {k: res["sweep"][k] for k in ("json", "png")}
    return res


def run_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from clipsearch.artifacts import ArtifactLayout
    from offline.evaluate import evaluate, format_table

    rec = evaluate(args.out, args.eval_split)
    print(format_table(rec))
    return {k: rec[k] for k in rec if k.startswith(("text_to_image_R@", "image_to_text_R@"))} | \
        {"json": str(ArtifactLayout(args.out).results_dir / f"recall_{args.eval_split}.json")}


def run_hubness(args: argparse.Namespace, loaded=None) -> dict[str, Any]:
    from offline.hubness import run_hubness as hubness

    loaded = loaded or _load(args)
    return hubness(args.out, loaded, bank_split=args.bank_split, select_split=args.select_split, k=args.hub_k,
                   embed_kwargs={"batch_size": args.batch_size, "workers": args.workers, "force": args.force,
                                 "image_backend": args.image_backend, "text_backend": args.text_backend})


def collection_name(args: argparse.Namespace, source: Path) -> str:
    """--collection, or the source's folder or file name made into a valid collection name."""
    import re

    from clipsearch.artifacts import check_collection_name

    if args.collection:
        return check_collection_name(args.collection)
    stem = Path(source).expanduser().resolve()
    stem_name = stem.stem if stem.is_file() else stem.name
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem_name).strip("-._")[:64] or "photos"
    return check_collection_name(name)


def write_model_record(out: Path, loaded) -> Path:
    """Record the model this project built, so `ingest` (and `serve.sh --media`) embed with it."""
    from clipsearch.artifacts import ArtifactLayout
    from clipsearch.manifest import write_json_atomic

    path = ArtifactLayout(out).model_record
    write_json_atomic(path, loaded.identity.to_dict())
    return path


def _ingest_model(args: argparse.Namespace):
    """--model/--pretrained when given, else the model the project built (<out>/model.json)."""
    from clipsearch.artifacts import ArtifactLayout
    from clipsearch.manifest import read_json
    from clipsearch.models import DEFAULT_PRETRAINED, ModelLoadError, is_offline_model, load_model

    if args.model is not None or args.pretrained is not None:
        if args.model is None and args.pretrained and Path(args.pretrained).expanduser().is_file():
            from clipsearch.models import checkpoint_model

            args.model = checkpoint_model(args.pretrained)  # the NAME.json beside a checkpoint we wrote
        args.model = args.model or "ViT-B-32"
        args.pretrained = args.pretrained or (None if is_offline_model(args.model) else DEFAULT_PRETRAINED)
        return _load(args)
    layout = ArtifactLayout(args.out)
    if not layout.model_record.is_file():
        raise ModelLoadError(
            f"no model built yet in {args.out}: build one with `python -m offline build --data "
            f"../shared/flickr8k --out {args.out}` (or `bash scripts/serve.sh --data DIR`), or pass "
            f"--model NAME --pretrained TAG|FILE")
    rec = read_json(layout.model_record)
    pretrained = rec.get("pretrained")
    if pretrained and rec.get("checkpoint_sha256") and not Path(pretrained).is_file():
        moved = layout.models_dir / Path(pretrained).name
        pretrained = str(moved) if moved.is_file() else pretrained
    log.info("model: %s (%s), as built in %s", rec.get("model"), pretrained, layout.model_record)
    return load_model(rec["model"], pretrained, args.device, checkpoint_sha256=rec.get("checkpoint_sha256"),
                      image_tta=rec.get("image_tta"))


def run_ingest(args: argparse.Namespace, loaded=None, source: Path | None = None,
               reuse_splits: bool = False) -> dict[str, Any]:
    """`reuse_splits` (build): copy the split embeddings this build made instead of embedding again."""
    from clipsearch.index import IndexParams
    from offline.ingest import ingest
    from offline.reuse import KnownVectors

    source = Path(source or args.source)
    name = collection_name(args, source)
    owned = loaded is None  # a model loaded here is ingest's alone: it may free the towers it won't run
    loaded = loaded or _ingest_model(args)
    params = IndexParams("hnsw", args.m, args.ef_construction, args.ef_search)
    result = ingest(source, args.out, name, loaded, batch_size=args.batch_size, workers=args.workers,
                    force=args.force, image_backend=args.image_backend, text_backend=args.text_backend,
                    params=params, release_torch=owned,
                    known=KnownVectors.from_splits(args.out, loaded.identity.to_dict()) if reuse_splits else None)
    if getattr(args, "store", "faiss") != "faiss":
        from offline.migrate import migrate

        result["migrate"] = migrate(args.out, name, args.store, api_key=args.api_key, params=params,
                                    force=args.force)
    return result


def run_migrate(args: argparse.Namespace) -> dict[str, Any]:
    from clipsearch.index import IndexParams
    from offline.migrate import migrate

    return migrate(args.out, args.collection, args.store, api_key=args.api_key, force=args.force,
                   params=IndexParams("hnsw", args.m, args.ef_construction, args.ef_search),
                   shards=args.shards, replicas=args.replicas)


def run_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from offline import finetune

    args.pretrained = _pretrained(args)
    return finetune.run(args)


def run_build(args: argparse.Namespace) -> dict[str, Any]:
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {}

    def stage(name: str, fn, *a):
        t = time.perf_counter()
        log.info("── %s", name)
        summary[name] = fn(*a)
        timings[name] = round(time.perf_counter() - t, 2)

    if args.data is None:
        args.data = DEFAULT_DATA
    if args.download and not Path(args.data).exists():
        args.dest = args.data
        stage("download", run_download, args)
    stage("prepare", run_prepare, args)
    from clipsearch.models import is_offline_model

    if is_offline_model(args.model) and args.pretrained is None:
        from offline.finetune import train_offline_model

        def train(a: argparse.Namespace) -> dict[str, Any]:
            ckpt = train_offline_model(a.out, threads=a.threads or os.cpu_count() or 1, device=a.device,
                                       model=a.model)
            return {"checkpoint": str(ckpt)}

        stage("finetune", train, args)
        args.pretrained = summary["finetune"]["checkpoint"]
    loaded = _load(args)
    write_model_record(args.out, loaded)
    stage("embed", run_embed, args, loaded)
    if not args.no_hubness and args.eval_split not in (args.bank_split, args.select_split):
        stage("hubness", run_hubness, args, loaded)
    stage("index", run_index, args)
    stage("evaluate", run_evaluate, args)
    if not args.no_ingest:
        stage("ingest", run_ingest, args, loaded, Path(args.data), True)
    summary["timings_seconds"] = timings
    return summary


def _keys_run(args: argparse.Namespace) -> dict[str, Any]:
    from offline import keys

    return keys.run(args)


def _watch_run(args: argparse.Namespace) -> dict[str, Any]:
    from offline import watch  # offline/watch.py takes the loader, so it need not import this module

    return watch.run(args, collection_name, _ingest_model)


COMMANDS = {"prepare": run_prepare, "download": run_download, "ingest": run_ingest, "migrate": run_migrate,
            "embed": run_embed,
            "index": run_index,
            "evaluate": run_evaluate, "hubness": run_hubness, "finetune": run_finetune, "build": run_build,
            "keys": _keys_run, "watch": _watch_run}


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """`parser`: a superset of `build_parser()` (the `clipsearch` command's)."""
    from clipsearch.manifest import ArtifactError
    from clipsearch.models import ModelLoadError
    from offline.data import DataError
    from offline.download import DownloadError
    from offline.finetune import FinetuneError

    args = (parser or build_parser()).parse_args(argv)
    _setup(args)
    t0 = time.perf_counter()
    try:
        result = COMMANDS[args.command](args)
    except (DataError, ModelLoadError, ArtifactError, DownloadError, FinetuneError, ValueError) as exc:
        log.debug("stage failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished parts are kept and a rerun resumes from them", file=sys.stderr)
        return 130
    log.info("%s done in %.1f s", args.command, time.perf_counter() - t0)
    print(json.dumps(result, indent=2, default=str))
    return 0
