"""`mic-diffrep check-leakage`: exact and near-duplicate images across or within folders."""

import os
from typing import Union

from ..data import DecodedImages, ImagePreprocessing, decode_images, load_image_folder, select_splits
from ..data.medical import add_slice_arguments, slice_selection
from ..leakage import DEFAULT_THRESHOLD, DuplicateGroupsReport, LeakageReport, check_leakage, within_duplicates
from ..utils import prepare_output_file
from .base import DeprecatedFlag


def _decode_folder(folder: str, namespace) -> DecodedImages:
    _, dataset = select_splits(load_image_folder(folder), ["all"])
    preprocessing = ImagePreprocessing(namespace.resolution, namespace.resize_mode, namespace.intensity_window)
    slices = slice_selection(namespace.slice_axis, namespace.slice_range, namespace.keep_empty_slices)
    return decode_images(dataset, preprocessing, skip_bad_images=namespace.skip_bad_images,
                         num_workers=namespace.dataloader_num_workers, cache_dir=namespace.cache_dir, slices=slices)


def check(namespace) -> Union[LeakageReport, DuplicateGroupsReport]:
    """Runs the check the flags describe, prints a summary and writes the report files."""
    if namespace.within is not None and namespace.test is not None:
        raise ValueError("--test goes with --train (test images against training ones); --within DIR groups the "
                         "duplicates inside one folder.")
    if (namespace.train is None) != (namespace.test is None):
        raise ValueError("--train and --test go together (or use --within DIR).")
    if namespace.train is not None:  # (real paths: a link to a folder is that folder)
        train, test = os.path.realpath(namespace.train), os.path.realpath(namespace.test)
        if os.path.commonpath([train, test]) in (train, test):
            raise ValueError(f"--train {namespace.train} and --test {namespace.test} share images (one folder holds "
                             f"the other, and every split of a folder is read): each shared image would match itself. "
                             f"Give folders apart, e.g. --train DATA_DIR/Training --test DATA_DIR/Testing.")
    if namespace.output is not None:
        if namespace.output.lower().endswith(".csv"):
            raise ValueError(f"--output {namespace.output}: give the JSON report's name (e.g. report.json); the CSV of "
                             f"pairs or groups is written beside it under the same name, ending in .csv.")
        prepare_output_file(namespace.output)
    mirror = not namespace.no_mirror
    if namespace.within is not None:
        report = within_duplicates(_decode_folder(namespace.within, namespace), namespace.duplicate_threshold,
                                   mirror=mirror)
        mixed = "" if report.num_mixed_label_groups is None else f", {report.num_mixed_label_groups} with mixed labels"
        print(f"{report.num_images_in_groups} of {report.num_images} images are in {report.num_duplicate_groups} "
              f"duplicate group(s) at threshold {report.threshold} ({report.num_exact_duplicates} exact copies{mixed}); "
              f"{report.num_groups} group(s) in all.")
    else:
        train, test = _decode_folder(namespace.train, namespace), _decode_folder(namespace.test, namespace)
        report = check_leakage(train, test, namespace.duplicate_threshold, mirror=mirror)
        labels = ("" if report.num_same_label is None
                  else f", {report.num_same_label} same label, {report.num_different_label} different label")
        print(f"{report.num_near} of {report.num_test} test images ({report.leaked_fraction:.1%}) have a near-duplicate "
              f"in train at threshold {report.threshold} ({report.num_exact} exact, {report.num_mirrored} mirrored"
              f"{labels}).")
    if report.skipped_images:
        print(f"{len(report.skipped_images)} unreadable file(s) skipped: "
              + ", ".join(item["path"] for item in report.skipped_images[:5])
              + (", ..." if len(report.skipped_images) > 5 else ""))
    if namespace.output is not None:
        report.save(namespace.output)
        report.save_csv(os.path.splitext(namespace.output)[0] + ".csv")
        print(f"Report written to {namespace.output}")
    return report


def register(subparsers) -> None:
    parser = subparsers.add_parser("check-leakage", help="Exact and near-duplicate images across or within folders.",
                                   description="Find test images with a near-identical training image (--train, "
                                               "--test), or duplicate groups within one folder (--within).")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--within", metavar="DIR", help="Group the exact and near-duplicates within this image folder.")
    mode.add_argument("--train", metavar="DIR", help="Training image folder (with --test).")
    parser.add_argument("--test", metavar="DIR", help="Test image folder, checked against --train.")
    parser.add_argument("--duplicate_threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="Fingerprint similarity that makes a near-duplicate (as `probe --duplicate_threshold`).")
    parser.add_argument("--threshold", type=float, dest="duplicate_threshold", action=DeprecatedFlag,
                        new_flag="--duplicate_threshold")
    parser.add_argument("--no_mirror", action="store_true", help="Do not match left-right mirrored copies.")
    parser.add_argument("--resolution", type=int, default=64,
                        help="Decode resolution; exact duplicates are compared at it.")
    parser.add_argument("--resize_mode", default="pad", choices=("pad", "center_crop"), help="As for training.")
    parser.add_argument("--intensity_window", default="percentile", choices=("percentile", "none"),
                        help="As for training.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="Processes decoding images.")
    parser.add_argument("--num_workers", type=int, dest="dataloader_num_workers", action=DeprecatedFlag,
                        new_flag="--dataloader_num_workers")
    parser.add_argument("--cache_dir", default=None, help="Where to cache the decoded images (default: no cache).")
    parser.add_argument("--skip_bad_images", action="store_true", help="Skip unreadable images instead of failing.")
    add_slice_arguments(parser)
    parser.add_argument("--output", default=None,
                        help="JSON report to write; the pairs (or groups) go to a CSV file beside it.")
    parser.set_defaults(func=check)
