"""Embed every image of a folder, a list or webdataset tar shards into the joint space (paper eq. 1): one unit
vector per image.

    python image_features_extraction.py -p runs/demo/best.pth.tar -d data/demo/images -o images.npz
    python image_features_extraction.py -p model.pth.tar -d photos/ --list selection.txt -o photos.npz --maps
    python image_features_extraction.py -p model.pth.tar -d photos/ -o photos.npz --resume   # after an interruption
    python image_features_extraction.py -p model.pth.tar -d 'shards/{000000..000009}.tar' -o features/
    torchrun --nproc_per_node=4 image_features_extraction.py -p model.pth.tar -d photos/ -o features/

Images: jpg, jpeg, png, bmp, webp (any case) under the folder, recursively, in sorted order; or the paths of
--list, in its order: one a line, or .jsonl / .csv / .parquet rows with 'path' and optional 'caption' (paths
relative to the folder or absolute); or, when -d ends in .tar, webdataset shards (brace patterns expanded, every
named shard must exist; a sample is the members sharing a key, the member path up to the first dot of its file
name: one image member plus an optional txt/json caption). Files that cannot be decoded are skipped and listed
with the reason; see misc/collections/extraction.py (decode_image) for how odd images are handled.

-o X.npz (small jobs): features (N, d) float32 unit rows; paths (N,) relative to the folder; skipped (K, 2) path
and reason; config, a JSON string (checkpoint, its sha256, model config, size); with --maps also the maps G
(N, D', h, w) float16 for localization (large: the estimate is printed before starting). Results are flushed
every --chunk-size images to OUT.parts/; --resume continues an interrupted run from there (only with the same
checkpoint, size, --maps and file list). OUT appears only when complete.

-o FOLDER (any name not ending in .npz): the sharded layout of misc/collections/shards.py, a shard being one tar
or --chunk-size files: manifest.json, emb/img/NNNNNN.npy (--dtype, float16 by default), meta/NNNNNN.parquet and
done/NNNNNN.json per shard. Running the same command again continues: only shards without a valid done record
are computed; a different checkpoint, size, dtype or shard list is refused. Under torchrun each rank takes the
shards n with n % WORLD_SIZE == RANK.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from misc.cli import add_device_args, add_extraction_args, add_size_arg, parser_for, positive_int, run
from misc.errors import UserError

log = logging.getLogger("image_features_extraction")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = parser_for(__doc__)
    add_extraction_args(parser, "folder", "image folder (searched recursively), or tar shards (a brace pattern "
                                          "ending in .tar)", batch_size=32)
    parser.add_argument("--list", type=Path, help="embed the files of this list (one path a line, or .jsonl, "
                                                  ".csv, .parquet with path and caption) instead")
    add_size_arg(parser)
    parser.add_argument("--chunk-size", type=positive_int, default=1000,
                        help="images per flushed part (.npz) or files per shard (folder output) (default: 1000)")
    parser.add_argument("--maps", action="store_true", help="also store the maps G (float16) for localization")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                        help="vectors of the sharded layout (default: float16)")
    add_device_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.size is not None and args.size < 32:
        raise UserError(f"--size {args.size}: at least 32 (the trunk divides it by 32)")
    from misc.collections.shards import is_sharded

    if is_sharded(args.out):
        return extract_sharded(args)
    if str(args.folder).endswith(".tar"):
        raise UserError(f"tar shards go to the sharded layout: -o a folder, not {args.out}")
    from misc.collections.extraction import describe_checkpoint, extract_images, log_skipped, maps_bytes
    from misc.collections.sources import read_entries
    from misc.data.images import list_images
    from misc.inference import Inference

    model = Inference.load(args.checkpoint, device=args.device, amp=args.amp)
    size = args.size or model.test_size
    entries = read_entries(args.list, args.folder)[0] if args.list else list_images(args.folder)
    if not entries:
        raise UserError(f"no images in {args.list or args.folder} (extensions: jpg, jpeg, png, bmp, webp)")
    if args.maps:
        estimate = maps_bytes(len(entries), model.model.config.maps_dim, size)
        log.warning("--maps: the maps G of %d images take about %.2f GB (%d bytes) in %s, and %.2f GB of memory per "
                    "chunk of %d images (lower --chunk-size if that is too much)", len(entries), estimate / 1e9,
                    estimate, args.out, maps_bytes(args.chunk_size, model.model.config.maps_dim, size) / 1e9,
                    args.chunk_size)
    record = describe_checkpoint(args.checkpoint, model.state, size=size, folder=str(args.folder.resolve()),
                                 maps=args.maps)
    log.info("embedding %d images from %s at %dx%d on %s", len(entries), args.folder, size, size, model.device)
    result = extract_images(model.model.image, args.folder, entries, args.out, size, record, device=model.device,
                            amp=model.amp, batch_size=args.batch_size,
                            workers=2 if args.workers is None else args.workers, chunk_size=args.chunk_size,
                            maps=args.maps, resume=args.resume, progress=not args.no_progress)
    log_skipped(result.skipped, args.out)
    resumed = f", {result.resumed_chunks} chunks resumed" if result.resumed_chunks else ""
    log.info("%d images embedded, %d skipped%s (%s) -> %s", result.count, len(result.skipped), resumed,
             result.timing.summary(), args.out)


def extract_sharded(args: argparse.Namespace) -> None:
    """The sharded layout: this rank's shards not done yet, into the folder -o."""
    if args.maps:
        raise UserError("--maps is only stored in an .npz output (-o X.npz)")
    from misc.collections.extraction import describe_checkpoint, log_skipped
    from misc.collections.shard_run import extract_shards, rank_and_world, rank_device, run_manifest
    from misc.collections.shards import ShardFolder
    from misc.collections.sources import find_shards
    from misc.inference import Inference

    rank, world = rank_and_world()
    shards, folder = find_shards(str(args.folder), args.list, args.chunk_size)
    if not shards:
        raise UserError(f"no images in {args.list or args.folder} (extensions: jpg, jpeg, png, bmp, webp)")
    model = Inference.load(args.checkpoint, device=rank_device(args.device), amp=args.amp)
    size = args.size or model.test_size
    record = describe_checkpoint(args.checkpoint, model.state, size=size,
                                 folder=str(folder.resolve()) if folder is not None else None)
    source = str(args.list.resolve() if args.list else folder.resolve() if folder else args.folder)
    manifest = run_manifest(source, shards, record, model.model.image.proj.out_features, args.dtype)
    store = ShardFolder(args.out)
    store.open(manifest, rank, world)
    try:
        log.info("rank %d of %d: %d shards from %s at %dx%d on %s", rank, world, len(shards), args.folder, size,
                 size, model.device)
        run = extract_shards(model.model.image, shards, folder, store, size=size, dtype=args.dtype,
                             device=model.device, amp=model.amp, batch_size=args.batch_size,
                             workers=2 if args.workers is None else args.workers, rank=rank, world=world,
                             progress=not args.no_progress)
    finally:
        store.close()
    log_skipped(run.skipped, args.out / "done", listed="'skipped_samples' of the done records in")
    log.info("rank %d: %d shards (%d already done), %d images embedded, %d skipped (%s) -> %s", rank,
             run.shards, run.resumed, run.rows, len(run.skipped), run.timing.summary(), args.out)


if __name__ == "__main__":
    run(main)
