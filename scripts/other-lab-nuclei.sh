#!/usr/bin/env bash
# Nuclei from a lab that trained nothing here, with hand-made reference masks, for
# checking that a model travels (docs/benchmarks.md, "Nuclei from another lab").
#
# The image is the 2D fluorescence example that the StarDist package ships
# (stardist/data/images/img2d.tif and mask2d.tif: one 512 x 512 image of the 2018
# Data Science Bowl, 125 annotated nuclei; Caicedo et al., Nature Methods 2019). It is
# taken out of the pinned wheel from PyPI (no install, no dependencies) and written as a
# Cell Tracking Challenge sequence:
#
#   DEST/01/t000.tif  DEST/01_GT/SEG/man_seg000.tif
#
# Usage: scripts/other-lab-nuclei.sh DEST
# Then:  cellswarm segment --movie DEST/01 --out seg && cellswarm eval --pred seg --gt DEST/01_GT
set -euo pipefail
dest="${1:?usage: $0 DEST}"
if [ -f "$dest/01_GT/SEG/man_seg000.tif" ] && [ -f "$dest/01/t000.tif" ]; then
    echo "$dest already holds the image and its masks"
    exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# The wheel for one fixed platform, whatever this machine's Python: only its data is used.
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.11 --platform manylinux_2_28_x86_64 --dest "$tmp" stardist==0.9.2
python3 - "$tmp" "$dest" <<'PY'
import glob, io, os, sys, zipfile
import numpy as np
import tifffile

wheel_dir, dest = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(wheel_dir, "stardist-0.9.2-*.whl"))
with zipfile.ZipFile(wheel) as z:
    image = tifffile.imread(io.BytesIO(z.read("stardist/data/images/img2d.tif")))
    masks = tifffile.imread(io.BytesIO(z.read("stardist/data/images/mask2d.tif")))
if image.shape != (512, 512) or masks.shape != image.shape:
    sys.exit(f"unexpected shapes in {wheel}: {image.shape}, {masks.shape}")
os.makedirs(os.path.join(dest, "01"), exist_ok=True)
os.makedirs(os.path.join(dest, "01_GT", "SEG"), exist_ok=True)
tifffile.imwrite(os.path.join(dest, "01", "t000.tif"), image.astype(np.uint16))
tifffile.imwrite(os.path.join(dest, "01_GT", "SEG", "man_seg000.tif"), masks.astype(np.uint16))
print(f"wrote {dest}: 1 image {image.shape}, {len(np.unique(masks)) - 1} annotated nuclei")
PY
