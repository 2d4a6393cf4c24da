#!/usr/bin/env python3
"""Writes a large OME-Zarr (NGFF 0.5) movie with its masks, for the larger-than-memory
training benchmark (docs/benchmarks.md, "Movies larger than memory").

Each frame tiles TILES x TILES fields of a small synthetic CTC movie (`cellswarm synth`),
each field of a different frame and mirrored by its position, with its masks relabelled
so that every cell of a frame has its own label. Written chunk by chunk through dask, so
the writer never holds the movie.

    cellswarm synth --out tile --profile balanced --frames 20 --size 512 --seed 11
    python3 scripts/big-movie.py tile/01 big.ome.zarr --frames 300 --tiles 4
"""
import argparse
import glob

import dask
import dask.array as da
import numpy as np
import tifffile
import zarr
from ome_zarr.format import FormatV05
from ome_zarr.io import parse_url
from ome_zarr.writer import write_image, write_labels

ap = argparse.ArgumentParser()
ap.add_argument("tile", help="a CTC sequence folder (t*.tif, with NN_GT/SEG beside it)")
ap.add_argument("out", help="the OME-Zarr image to write")
ap.add_argument("--frames", type=int, default=300)
ap.add_argument("--tiles", type=int, default=4)
a = ap.parse_args()

images = np.stack([tifffile.imread(p) for p in sorted(glob.glob(a.tile + "/t*.tif"))])
masks = np.stack([tifffile.imread(p) for p in sorted(glob.glob(a.tile + "_GT/SEG/man_seg*.tif"))])
n, h, w = images.shape
k = a.tiles
# Labels of field i are offset by i * stride, so they stay unique within uint16.
stride = int(masks.max()) + 1
assert stride * k * k < 65536, "too many cells for uint16 labels"


def field(t, i, source, relabel):
    f = source[(t + 7 * i) % n]
    if i % 2:
        f = f[:, ::-1]
    if (i // k) % 2:
        f = f[::-1, :]
    if relabel:
        f = np.where(f > 0, f.astype(np.uint16) + i * stride, 0).astype(np.uint16)
    return f


def frame(t, source, relabel, dtype):
    rows = [np.concatenate([field(t, r * k + c, source, relabel) for c in range(k)], axis=1) for r in range(k)]
    return np.concatenate(rows, axis=0).astype(dtype)


def movie(source, relabel, dtype):
    parts = [
        da.from_delayed(dask.delayed(frame)(t, source, relabel, dtype), shape=(h * k, w * k), dtype=dtype)
        for t in range(a.frames)
    ]
    return da.stack(parts).rechunk((1, 1024, 1024))


fmt = FormatV05()
root = zarr.group(store=parse_url(a.out, mode="w", fmt=fmt).store, zarr_format=fmt.zarr_format)
write_image(movie(images, False, images.dtype), root, axes="tyx", fmt=fmt, scale_factors=())
write_labels(
    movie(masks, True, np.uint16), root, name="cells", axes="tyx", fmt=fmt, scaler=None, scale_factors=()
)
print(f"wrote {a.frames} frames of {h * k} x {w * k} to {a.out}")
