"""Embed every image of a folder into the joint space (paper eq. 1): one unit vector per image.

    python image_features_extraction.py -p runs/demo/best.pth.tar -d data/demo/images -o images.npz
    python image_features_extraction.py -p model.pth.tar -d photos/ --list selection.txt -o photos.npz --maps
    python image_features_extraction.py -p model.pth.tar -d photos/ -o photos.npz --resume   # after an interruption

Images: jpg, jpeg, png, bmp, webp (any case) under the folder, recursively, in sorted order; or the paths of
--list (one a line, relative to the folder or absolute), in the list's order. Files that cannot be decoded are
skipped and listed with the reason; see misc/collections/extraction.py (decode_image) for how odd images are handled.

Output (.npz): features (N, d) float32 unit rows; paths (N,) relative to the folder; skipped (K, 2) path and
reason; config, a JSON string (checkpoint, its sha256, model config, size); with --maps also the maps G
(N, D', h, w) float16 for localization (large: the estimate is printed before starting).

Results are flushed every --chunk-size images to OUT.parts/; --resume continues an interrupted run from there
(only with the same checkpoint, size, --maps and file list). OUT appears only when complete.
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
    add_extraction_args(parser, "folder", "image folder (searched recursively)", batch_size=32)
    parser.add_argument("--list", type=Path, help="embed the files of this list (one path a line) instead")
    add_size_arg(parser)
    parser.add_argument("--chunk-size", type=positive_int, default=1000, help="images per flushed part (default: 1000)")
    parser.add_argument("--maps", action="store_true", help="also store the maps G (float16) for localization")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    add_device_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.size is not None and args.size < 32:
        raise UserError(f"--size {args.size}: at least 32 (the trunk divides it by 32)")
    from misc.collections.extraction import describe_checkpoint, extract_images, log_skipped, maps_bytes
    from misc.data.images import list_images, read_list
    from misc.inference import Inference

    model = Inference.load(args.checkpoint, device=args.device, amp=args.amp)
    size = args.size or model.test_size
    entries = read_list(args.list, args.folder) if args.list else list_images(args.folder)
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
    log.info("%d images embedded, %d skipped%s (%.1f images/s) -> %s", result.count, len(result.skipped), resumed,
             result.timing.images_per_s, args.out)


if __name__ == "__main__":
    run(main)
