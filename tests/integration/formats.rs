//! Movies as labs have them: OME-TIFF written by `tifffile` (as microscope software
//! writes it: several channels, physical sizes in µm) read by `segment`, `track` and
//! `train`, and the label movies cellswarm writes read back by `tifffile`.

use std::path::Path;
use std::process::Command;

use crate::util::{cellswarm, have_python_modules, ok_stdout};

fn have_tifffile() -> bool {
    have_python_modules("tifffile, numpy", "tifffile")
}

/// A small synthetic CTC movie in `d/movie`: 4 frames of 96 x 96, with masks.
fn synth_movie(d: &Path) {
    let _ = ok_stdout(&cellswarm(
        d,
        &[
            "synth",
            "--out",
            "movie",
            "--profile",
            "balanced",
            "--frames",
            "4",
            "--seed",
            "9",
            "--size",
            "96",
        ],
    ));
}

/// `cellswarm train` for 5 steps of a tiny network on frames 0-2 of `data` (channel
/// `nuclei`), scored on frame 3: the output.
fn train_briefly(d: &Path, data: &str) -> String {
    ok_stdout(&cellswarm(
        d,
        &[
            "train",
            "--data",
            data,
            "--channel",
            "nuclei",
            "--out",
            "model",
            "--frames",
            "0-2",
            "--val-frames",
            "3-3",
            "--steps",
            "5",
            "--patch",
            "32",
            "--batch",
            "4",
            "--depth",
            "2",
            "--width",
            "4",
        ],
    ))
}

fn python(dir: &Path, script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .current_dir(dir)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A CTC movie as a two-channel OME-TIFF (T, C, Y, X; channel 0 a dim "membrane" stain
/// that is not the frames, channel 1 "nuclei", the frames), and its reference masks as
/// the label movie beside it, written the way tifffile writes a microscope's files.
const TO_OME: &str = r#"
import sys, glob
import numpy as np, tifffile
src, gt, out, masks = sys.argv[1:5]
frames = np.stack([tifffile.imread(p) for p in sorted(glob.glob(src + "/t*.tif"))])
membrane = (frames.max() - frames) // 7
movie = np.stack([membrane, frames], axis=1)
meta = {"axes": "TCYX", "Channel": {"Name": ["membrane", "nuclei"]},
        "PhysicalSizeX": 0.65, "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": 0.65, "PhysicalSizeYUnit": "µm"}
tifffile.imwrite(out, movie, ome=True, metadata=meta)
labels = np.stack([tifffile.imread(p) for p in sorted(glob.glob(gt + "/man_seg*.tif"))])
tifffile.imwrite(masks, labels.astype(np.uint16), ome=True, metadata={"axes": "TYX"})
print(movie.shape, labels.shape)
"#;

/// Compares cellswarm's OME-TIFF label movie with its CTC mask files, read by
/// tifffile, and prints the pixel size tifffile finds in its OME-XML.
const COMPARE: &str = r#"
import sys, glob
import numpy as np, tifffile
ome, ctc = sys.argv[1:3]
with tifffile.TiffFile(ome) as f:
    assert f.is_ome, "not an OME-TIFF"
    series = f.series[0]
    a = series.asarray()
    meta = tifffile.xml2dict(f.ome_metadata)["OME"]["Image"]["Pixels"]
b = np.stack([tifffile.imread(p) for p in sorted(glob.glob(ctc + "/mask*.tif"))])
a = a.reshape(b.shape)
print("axes", series.axes, "shape", a.shape, "equal", bool((a == b).all()),
      "objects", int(sum(len(np.unique(x)) - 1 for x in b)),
      "size", meta.get("PhysicalSizeX"), meta.get("SizeT"))
"#;

#[test]
fn ome_tiff_movies_from_tifffile_segment_track_and_train_like_their_ctc_frames() {
    if !have_tifffile() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    synth_movie(d);
    let shapes = python(
        d,
        TO_OME,
        &[
            "movie/01",
            "movie/01_GT/SEG",
            "cells.ome.tif",
            "cells_masks.ome.tif",
        ],
    );
    assert!(shapes.contains("(4, 2, 96, 96)"), "{shapes}");

    // Two channels: segment needs a choice, and says which it has.
    let out = cellswarm(
        d,
        &["segment", "--movie", "cells.ome.tif", "--out", "x.ome.tif"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "no channel chosen, yet it ran");
    assert!(
        err.contains("cells.ome.tif") && err.contains("membrane, nuclei"),
        "{err}"
    );
    let out = cellswarm(
        d,
        &[
            "segment",
            "--movie",
            "cells.ome.tif",
            "--channel",
            "dapi",
            "--out",
            "x.ome.tif",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dapi"));

    // The nuclei channel segments exactly as the CTC frames it was made of (the built-in
    // model, one width estimate), written as an OME-TIFF label movie that tifffile reads.
    let _ = ok_stdout(&cellswarm(
        d,
        &["segment", "--movie", "movie/01", "--out", "ctc-seg"],
    ));
    let out = ok_stdout(&cellswarm(
        d,
        &[
            "segment",
            "--movie",
            "cells.ome.tif",
            "--channel",
            "nuclei",
            "--out",
            "seg/cells_masks.ome.tif",
        ],
    ));
    assert!(out.contains("wrote 4 frames"), "{out}");
    let cmp = python(d, COMPARE, &["seg/cells_masks.ome.tif", "ctc-seg"]);
    assert!(cmp.contains("equal True"), "{cmp}");
    assert!(
        cmp.contains("size 0.65 4"),
        "pixel size and frames carried: {cmp}"
    );
    let objects: u64 = cmp
        .split_whitespace()
        .skip_while(|w| *w != "objects")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(objects >= 4, "the movie's cells were found: {cmp}");

    // Channel by index, tracked: the same masks as tracking the CTC frames.
    let _ = ok_stdout(&cellswarm(
        d,
        &["track", "--movie", "movie/01", "--out", "ctc-trk"],
    ));
    let _ = ok_stdout(&cellswarm(
        d,
        &[
            "track",
            "--movie",
            "cells.ome.tif",
            "--channel",
            "1",
            "--out",
            "ome-trk",
        ],
    ));
    assert_eq!(
        std::fs::read_to_string(d.join("ome-trk/res_track.txt")).unwrap(),
        std::fs::read_to_string(d.join("ctc-trk/res_track.txt")).unwrap()
    );

    // Training finds the label movie beside the OME-TIFF and scores on it.
    let out = train_briefly(d, "cells.ome.tif");
    assert!(out.contains("trained 5 steps"), "{out}");
    assert!(out.contains("held-out frames 3-3: F1@0.5"), "{out}");
}

fn have_ome_zarr() -> bool {
    have_python_modules("ome_zarr, zarr, tifffile", "ome-zarr")
}

/// A CTC movie as OME-Zarr images written by ome-zarr-py, the NGFF reference
/// implementation: NGFF 0.4 (Zarr v2) and 0.5 (Zarr v3), two channels, physical sizes,
/// its reference masks as the image's label image `labels/cells`.
const TO_ZARR: &str = r#"
import sys, glob
import numpy as np, tifffile, zarr
from ome_zarr.io import parse_url
from ome_zarr.writer import write_image, write_labels
from ome_zarr.format import FormatV04, FormatV05
src, gt = sys.argv[1:3]
frames = np.stack([tifffile.imread(p) for p in sorted(glob.glob(src + "/t*.tif"))])
labels = np.stack([tifffile.imread(p) for p in sorted(glob.glob(gt + "/man_seg*.tif"))])
movie = np.stack([(frames.max() - frames) // 7, frames], axis=1)
for name, fmt in [("cells04.ome.zarr", FormatV04()), ("cells05.ome.zarr", FormatV05())]:
    root = zarr.group(store=parse_url(name, mode="w", fmt=fmt).store, zarr_format=fmt.zarr_format)
    write_image(movie, root, axes="tcyx", fmt=fmt)
    write_labels(labels.astype(np.uint16), root, name="cells", axes="tyx", fmt=fmt)
    # What a converter from a microscope's format adds: units, pixel size, channel names
    # (ome-zarr-py's writer leaves them to the caller).
    attrs = root.attrs.asdict()
    meta = attrs["ome"] if "ome" in attrs else attrs
    ms = meta["multiscales"][0]
    for ax in ms["axes"]:
        if ax["type"] == "space":
            ax["unit"] = "micrometer"
    for level in ms["datasets"]:
        for tr in level["coordinateTransformations"]:
            if tr["type"] == "scale":
                tr["scale"] = [tr["scale"][0], tr["scale"][1], tr["scale"][2] * 0.65, tr["scale"][3] * 0.65]
    meta["omero"] = {"channels": [{"label": "membrane"}, {"label": "nuclei"}]}
    root.attrs.update(attrs)
print(movie.shape)
"#;

/// Reads cellswarm's OME-Zarr label image with ome-zarr-py's reader and compares it
/// with its CTC mask files.
const COMPARE_ZARR: &str = r#"
import sys, glob
import numpy as np, tifffile
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
path, ctc = sys.argv[1:3]
nodes = list(Reader(parse_url(path))())
# A label image that names its source image comes after that image (and its other
# label images): take the node read from `path` itself.
image = next(n for n in nodes if n.zarr.basename() == path.rstrip("/").split("/")[-1])
a = np.asarray(image.data[0])
axes = [ax["name"] for ax in image.metadata["axes"]]
scale = image.metadata["coordinateTransformations"][0][0]["scale"]
b = np.stack([tifffile.imread(p) for p in sorted(glob.glob(ctc + "/mask*.tif"))])
print("axes", "".join(axes), "equal", bool((a.reshape(b.shape) == b).all()), "scale", scale[-1],
      "labels", "image-label" in str(image.zarr.root_attrs))
"#;

#[test]
fn ome_zarr_images_from_ome_zarr_py_segment_and_train_and_ours_read_back() {
    if !have_ome_zarr() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    synth_movie(d);
    let shape = python(d, TO_ZARR, &["movie/01", "movie/01_GT/SEG"]);
    assert!(shape.contains("(4, 2, 96, 96)"), "{shape}");
    let _ = ok_stdout(&cellswarm(
        d,
        &["segment", "--movie", "movie/01", "--out", "ctc-seg"],
    ));
    for (image, out) in [
        ("cells04.ome.zarr", "seg04.ome.zarr"),
        ("cells05.ome.zarr", "seg05.ome.zarr"),
    ] {
        let printed = ok_stdout(&cellswarm(
            d,
            &[
                "segment",
                "--movie",
                image,
                "--channel",
                "nuclei",
                "--out",
                out,
            ],
        ));
        assert!(
            printed.contains("wrote 4 frames") && printed.contains("OME-Zarr"),
            "{printed}"
        );
        let cmp = python(d, COMPARE_ZARR, &[out, "ctc-seg"]);
        assert!(
            cmp.contains("axes tyx equal True scale 0.65 labels True"),
            "{image}: {cmp}"
        );
    }
    // Written into the NGFF 0.5 image as a second label image beside ome-zarr-py's, read
    // back by ome-zarr-py and listed in the image's labels group.
    let printed = ok_stdout(&cellswarm(
        d,
        &[
            "segment",
            "--movie",
            "cells05.ome.zarr",
            "--channel",
            "nuclei",
            "--out",
            "cells05.ome.zarr/labels/ours",
        ],
    ));
    assert!(printed.contains("wrote 4 frames"), "{printed}");
    let cmp = python(
        d,
        COMPARE_ZARR,
        &["cells05.ome.zarr/labels/ours", "ctc-seg"],
    );
    assert!(
        cmp.contains("axes tyx equal True scale 0.65 labels True"),
        "{cmp}"
    );
    let group = std::fs::read_to_string(d.join("cells05.ome.zarr/labels/zarr.json")).unwrap();
    assert!(
        group.contains("\"cells\"") && group.contains("\"ours\""),
        "{group}"
    );
    let out = cellswarm(
        d,
        &[
            "segment",
            "--movie",
            "cells05.ome.zarr",
            "--out",
            "x.ome.zarr",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("membrane, nuclei"), "{err}");
    let out = cellswarm(
        d,
        &["segment", "--movie", "movie/01", "--out", "seg05.ome.zarr"],
    );
    assert!(
        !out.status.success(),
        "an existing image is not overwritten"
    );

    // The label image inside the NGFF image is its training masks.
    let out = train_briefly(d, "cells04.ome.zarr");
    assert!(out.contains("trained 5 steps"), "{out}");
    assert!(out.contains("held-out frames 3-3: F1@0.5"), "{out}");
}

/// The synthetic movie's frames as 3D stacks of three planes (the nuclei dimmer above
/// and below their middle plane) with 3D masks: as a CTC folder of multi-page TIFF
/// frames, and as an NGFF 0.4 image (t, c, z, y, x) with a `labels/cells` label image.
const TO_3D: &str = r#"
import sys, glob, os
import numpy as np, tifffile, zarr
from ome_zarr.io import parse_url
from ome_zarr.writer import write_image, write_labels
from ome_zarr.format import FormatV04
src, gt = sys.argv[1:3]
frames = np.stack([tifffile.imread(p) for p in sorted(glob.glob(src + "/t*.tif"))]).astype(np.float32)
labels = np.stack([tifffile.imread(p) for p in sorted(glob.glob(gt + "/man_seg*.tif"))])
bg = np.median(frames)
stacks = np.stack([bg + 0.6 * (frames - bg), frames, bg + 0.6 * (frames - bg)], axis=1).astype(np.uint16)
masks = np.stack([labels] * 3, axis=1).astype(np.uint16)
os.makedirs("stacks/01", exist_ok=True)
os.makedirs("stacks/01_GT/SEG", exist_ok=True)
for t in range(len(stacks)):
    tifffile.imwrite(f"stacks/01/t{t:03d}.tif", stacks[t], photometric="minisblack")
    tifffile.imwrite(f"stacks/01_GT/SEG/man_seg{t:03d}.tif", masks[t], photometric="minisblack")
fmt = FormatV04()
root = zarr.group(store=parse_url("stacks.ome.zarr", mode="w", fmt=fmt).store, zarr_format=2)
write_image(stacks[:, None], root, axes="tczyx", fmt=fmt)
write_labels(masks, root, name="cells", axes="tzyx", fmt=fmt)
print(stacks.shape)
"#;

#[test]
fn a_swarm_trains_on_3d_stacks_from_a_ctc_folder_and_an_ome_zarr_image() {
    if !have_ome_zarr() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    synth_movie(d);
    let shape = python(d, TO_3D, &["movie/01", "movie/01_GT/SEG"]);
    assert!(shape.contains("(4, 3, 96, 96)"), "{shape}");
    // Two sites, one per format, each a movie of 3D stacks: one round of the real swarm
    // (two nodes over loopback, U-Net training on the stacks' planes, the deltas signed,
    // exchanged and merged), scored in 3D on each site's held-out stack.
    let out = ok_stdout(&cellswarm(
        d,
        &[
            "demo",
            "--out",
            "report",
            "--sites",
            "2",
            "--data",
            "stacks/01",
            "stacks.ome.zarr",
            "--no-baselines",
            "--rounds",
            "1",
            "--steps",
            "3",
        ],
    ));
    assert!(out.contains("round  1"), "{out}");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("report/metrics.json")).unwrap()).unwrap();
    assert_eq!(
        v["movies"],
        serde_json::json!(["stacks/01", "stacks.ome.zarr"])
    );
    let f1 = v["union"]["swarm"].as_f64().unwrap_or(-1.0);
    assert!((0.0..=1.0).contains(&f1), "{v}");
    assert_eq!(v["rounds"].as_array().map(Vec::len), Some(1));
}
