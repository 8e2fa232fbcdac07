#!/usr/bin/env python
"""Builds the small MRI sample bundled in `mic_diffrep/sample_data/brain-tumor-mri/` (tests, demo, `mic-diffrep run`).

    python scripts/make_sample_data.py --source ../shared/data/brain-tumor-mri

Takes `--per_class` images per class from the Brain Tumor MRI dataset (CC0 1.0), at most one per near-duplicate group
(groups from `mic_diffrep.leakage`), so no slice has a twin anywhere in the sample; splits them into `Training/` and
`Testing/` (`--test_per_class` each), half from each source of `sources.csv` where possible, and stores them as
`--size` px grey JPEGs with a `sources.csv` of their own.
"""

import argparse
import csv
import os
import shutil

import numpy as np
import PIL.Image

from mic_diffrep.data import decode_images, load_image_folder
from mic_diffrep.leakage import DEFAULT_THRESHOLD, duplicate_groups, fingerprint_images
from mic_diffrep.data import image_to_pixels


README = """# Sample of the Brain Tumor MRI Dataset

{total} brain MRI slices ({per_class} per class: glioma, meningioma, notumor, pituitary), {size} x {size} grey JPEGs,
split into `Training/` ({train_per_class} per class) and `Testing/` ({test_per_class} per class). Used by the tests and by
`mic-diffrep run`.

- Source: "Brain Tumor MRI Dataset", Msoud Nickparvar, 2021 (Kaggle), which combines the figshare (Cheng et al.),
  SARTAJ and Br35H collections. Taken from its Training split.
- Licence: **CC0 1.0** (public domain dedication), as the source.
- Made by `python scripts/make_sample_data.py` (seed {seed}): at most one image per near-duplicate group of the
  full folder (`mic_diffrep.leakage.duplicate_groups`, threshold {threshold}, mirrored copies included), so no
  slice in the sample has a twin anywhere in it; half from each source collection where possible; resized with the
  package's preprocessing (padding, bicubic). `sources.csv` lists each file's class and source collection.
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="../shared/data/brain-tumor-mri", help="The full dataset folder.")
    parser.add_argument("--output", default="mic_diffrep/sample_data/brain-tumor-mri", help="Sample folder to write.")
    parser.add_argument("--per_class", type=int, default=40, help="Images per class in all.")
    parser.add_argument("--test_per_class", type=int, default=10, help="Of those, images per class in Testing/.")
    parser.add_argument("--size", type=int, default=64, help="Stored image size (px).")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train = load_image_folder(os.path.join(args.source, "Training"))["train"]
    decoded = decode_images(train, 64, cache_dir=os.path.expanduser("~/.cache/mic_diffrep/decoded"))
    groups = duplicate_groups(fingerprint_images(decoded.pixels), DEFAULT_THRESHOLD)
    with open(os.path.join(args.source, "sources.csv"), newline="") as f:
        source_of = {row["file"]: row["source"] for row in csv.DictReader(f)}
    relative = [os.path.relpath(p, args.source) for p in decoded.paths]

    rng = np.random.default_rng(args.seed)
    shutil.rmtree(args.output, ignore_errors=True)
    rows = []
    for label, name in enumerate(decoded.label_names):
        candidates = [i for i in rng.permutation(len(relative)).tolist() if decoded.labels[i] == label]
        chosen, used_groups = {"sartaj": [], "figshare_or_br35h": []}, set()
        for i in candidates:  # one image per duplicate group, half from each source where possible
            source = source_of[relative[i]]
            if groups[i] in used_groups or len(chosen[source]) >= args.per_class // 2:
                continue
            chosen[source].append(i)
            used_groups.add(groups[i])
        picked = chosen["sartaj"] + chosen["figshare_or_br35h"]
        for i in candidates:  # top up from either source when one has too few
            if len(picked) >= args.per_class:
                break
            if groups[i] not in used_groups:
                picked.append(i)
                used_groups.add(groups[i])
        picked = rng.permutation(picked).tolist()
        for position, i in enumerate(picked):
            split = "Testing" if position < args.test_per_class else "Training"
            folder = os.path.join(args.output, split, name)
            os.makedirs(folder, exist_ok=True)
            with PIL.Image.open(decoded.paths[i]) as image:
                small = image_to_pixels(image, args.size, intensity_window="none")[0].numpy()  # as made
            file = os.path.join(split, name, os.path.basename(relative[i]))
            PIL.Image.fromarray(small).save(os.path.join(args.output, file), quality=args.quality)
            rows.append({"file": file, "label": name, "source": source_of[relative[i]]})
    with open(os.path.join(args.output, "sources.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "label", "source"])
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["file"]))
    with open(os.path.join(args.output, "README.md"), "w") as f:
        f.write(README.format(total=len(rows), per_class=args.per_class, size=args.size, seed=args.seed,
                              train_per_class=args.per_class - args.test_per_class,
                              test_per_class=args.test_per_class, threshold=DEFAULT_THRESHOLD))
    print(f"Wrote {len(rows)} images to {args.output}")


if __name__ == "__main__":
    main()
