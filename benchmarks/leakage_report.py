#!/usr/bin/env python
"""Exact and near-duplicate images in the Brain Tumor MRI `Training/` folder, within it and across its two sources.

    python benchmarks/leakage_report.py --data_dir ../shared/data/brain-tumor-mri

Writes `benchmarks/results/leakage.{json,md}` (and the duplicate groups as CSV). The same numbers come from the CLI:
`mic-diffrep check-leakage --within DIR/Training` and `mic-diffrep check-leakage --train A --test B`.
"""

import argparse
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mic_diffrep.data import decode_images, load_image_folder  # noqa: E402
from mic_diffrep.leakage import DEFAULT_THRESHOLD, check_leakage, within_duplicates  # noqa: E402
from mic_diffrep.utils import environment_info  # noqa: E402
from common import (OVERWRITE_HELP, HelpFormatter, check_recorded_results, command_line, image_sources,  # noqa: E402
                    machine_line, output_prefix, run_main)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_dir", default=os.path.join(REPO, "..", "shared", "data", "brain-tumor-mri"))
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--cache_dir", default=os.path.join(REPO, "runs", "benchmark", "decoded"))
    parser.add_argument("--output", type=output_prefix, default=os.path.join(REPO, "benchmarks", "results", "leakage"))
    parser.add_argument("--overwrite_output", action="store_true", help=OVERWRITE_HELP)
    args = parser.parse_args()
    check_recorded_results(args.output, args.overwrite_output)

    images = decode_images(load_image_folder(os.path.join(args.data_dir, "Training"))["train"], args.resolution,
                           cache_dir=args.cache_dir)
    sources = image_sources(args.data_dir, images.paths)

    within = within_duplicates(images, args.threshold)
    within_plain = within_duplicates(images, args.threshold, mirror=False)
    group_sources = {}
    for index, group in enumerate(within.group_ids):
        group_sources.setdefault(group, set()).add(sources[index])
    spanning = [g for g in within.groups if len(group_sources[g["group"]]) > 1]
    sartaj = images.subset(np.flatnonzero(sources == "sartaj").tolist())
    other = images.subset(np.flatnonzero(sources != "sartaj").tolist())
    cross = {"sartaj_in_other": check_leakage(other, sartaj, args.threshold),
             "other_in_sartaj": check_leakage(sartaj, other, args.threshold)}

    command = command_line()
    result = {
        "command": command, "environment": environment_info(), "threshold": args.threshold,
        "resolution": args.resolution, "num_images": len(images),
        "within": {k: v for k, v in within.to_dict().items() if k not in ("group_ids", "groups")},
        "within_without_mirroring": {k: v for k, v in within_plain.to_dict().items() if k not in ("group_ids", "groups")},
        "largest_group_size": within.groups[0]["size"] if within.groups else 1,
        "groups_spanning_both_sources": len(spanning),
        "images_in_groups_spanning_both_sources": sum(g["size"] for g in spanning),
        "cross_source": {name: {k: v for k, v in report.to_dict().items() if k not in ("pairs", "leaked_test_indices")}
                         for name, report in cross.items()},
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".json", "w") as f:
        json.dump(result, f, indent=2)
    within.save_csv(args.output + "_groups.csv")
    w, wp = result["within"], result["within_without_mirroring"]
    s, o = result["cross_source"]["sartaj_in_other"], result["cross_source"]["other_in_sartaj"]
    lines = [
        "# Duplicates in the Brain Tumor MRI training folder", "",
        f"Command: `{command}`  ",
        machine_line(result["environment"], ("torch", "datasets")), "",
        f"Fingerprints of {args.resolution} px decoded images (`mic_diffrep.leakage`: foreground-aligned 16x16, "
        f"cosine similarity >= {args.threshold}, left-right mirrored copies included unless stated).", "",
        f"- {w['num_images_in_groups']} of {w['num_images']} images have at least one near-duplicate in the folder "
        f"({wp['num_images_in_groups']} without counting mirrored copies); they form {w['num_duplicate_groups']} "
        f"groups, the largest of {result['largest_group_size']} images; {w['num_exact_duplicates']} images are "
        f"pixel-identical copies of another; {w['num_mixed_label_groups']} groups mix labels.",
        f"- {result['groups_spanning_both_sources']} groups ({result['images_in_groups_spanning_both_sources']} images) "
        "span both sources of `sources.csv`.",
        f"- {s['num_near']} of {s['num_test']} sartaj images have a near-duplicate among the figshare_or_br35h images "
        f"({s['num_mirrored']} of them mirrored, {s['num_exact']} exact; {s['num_different_label']} with a different "
        "label).",
        f"- {o['num_near']} of {o['num_test']} figshare_or_br35h images have a near-duplicate among the sartaj images "
        f"({o['num_mirrored']} mirrored, {o['num_exact']} exact; {o['num_different_label']} with a different label).",
        "", f"The duplicate groups are listed in `{os.path.basename(args.output)}_groups.csv`.", "",
    ]
    with open(args.output + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
