"""Reading clinical image formats (DICOM, NIfTI) into 2-D grey slices.

The readers use the field's libraries, `pydicom` for DICOM and `nibabel` for NIfTI (both optional: they are
imported when a file is read, and a missing one raises [`MedicalImageError`] saying what to `pip install`). Every
reader returns a list of [`MedicalSlice`]: float64 pixels in the file's physical units, rows x columns as they are
displayed, plus the display window the file carries (or `None`, in which case the caller picks a percentile window).

DICOM ([`read_dicom`], `.dcm` / `.dicom`):

- Pixels are the stored values passed through the Modality LUT: *RescaleSlope* / *RescaleIntercept* (or a
  *Modality LUT Sequence*) with `pydicom.pixels.apply_modality_lut`. For enhanced multi-frame files without
  top-level rescale attributes, the frame's *Pixel Value Transformation Sequence* (per-frame, else shared
  functional group) is used.
- Window: from *WindowCenter* `c` / *WindowWidth* `w` (the first value when multi-valued; the frame's *Frame VOI
  LUT Sequence* for enhanced multi-frame files), as `(c - w / 2, c + w / 2)`, in the same physical units as the
  pixels. This is DICOM's "LINEAR_EXACT" VOI function, and the continuous approximation of the default "LINEAR"
  one (PS3.3 C.11.2.1.2.1, whose ramp runs from `c - 0.5 - (w - 1) / 2` to `c - 0.5 + (w - 1) / 2`);
  *VOILUTFunction* (e.g. SIGMOID) and *VOI LUT Sequence* are not applied. No window (or `w <= 0`): `None`.
- MONOCHROME1 (minimum = white) is inverted so that bright means high signal, as in MONOCHROME2: with `lo` / `hi`
  the physical values of the smallest / largest storable value (from *BitsStored* and *PixelRepresentation*,
  through the same Modality LUT; the frame's own min / max for float pixel data), pixels become
  `lo + hi - pixels` and the window `(lo + hi - high, lo + hi - low)`, so it still selects the same tissue.
- A multi-frame file (*NumberOfFrames* > 1) gives one slice per frame (`slice_index` = frame index); a single
  frame gives one slice with `slice_index=None`.
- Refused with [`MedicalImageError`]: colour images (*PhotometricInterpretation* not MONOCHROME1/MONOCHROME2, or
  *SamplesPerPixel* != 1), compressed transfer syntaxes that no installed plugin decodes (the message names the
  transfer syntax and what to `pip install`), files without pixel data, truncated or non-DICOM files.

NIfTI ([`read_nifti`], `.nii` / `.nii.gz`):

- 4-D files: the first volume (`t = 0`) is used; extra dimensions beyond the 4th must have length 1.
- The image is reoriented to RAS+ with `nibabel.as_closest_canonical`, so the slicing axis and the in-plane
  orientation come from the affine, not from the storage order: after it, voxel axis 0 runs Left -> Right,
  axis 1 Posterior -> Anterior, axis 2 Inferior -> Superior. Pixels are `get_fdata()` (with `scl_slope` /
  `scl_inter` applied).
- A volume gives one slice per index along `slice_axis` (0 = sagittal, 1 = coronal, 2 = axial); `slice_range`
  `(start, stop)` keeps `range(n)[start:stop]` of those indices (after reorientation).
- Display: the radiological convention, in which DICOM axial images are stored and clinical viewers show them
  (image left = patient right). The slice keeps the two other RAS axes `(a, b)`, `a < b`, and is shown as
  `np.fliplr(np.flipud(slice.T))`: rows run from +b at the top to -b at the bottom, columns from +a on the left to
  -a on the right, as in DICOM's LPS display. Axial: anterior at the top, posterior at the bottom, the patient's
  right on the image's left and left on the right. Coronal: superior at the top, patient right -> left.
  Sagittal: superior at the top, anterior -> posterior.
- A single-slice image (a 2-D file, or a 3-D one with one spatial axis of length 1 after reorientation) gives
  exactly one slice cut across that axis, whatever `slice_axis` and `slice_range` say, with `slice_index=None`
  (a range chosen for volumes would otherwise leave nothing of a 2-D file).
- `skip_empty_slices=True` drops slices whose finite pixels are all equal (e.g. the all-zero slices around a
  skull-stripped brain; all-NaN slices too). `num_slices` counts the slices along the axis before `slice_range`
  and `skip_empty_slices`. No slice left: [`MedicalImageError`].
- Window: NIfTI has no display window, except the header's `cal_min` / `cal_max`: `(cal_min, cal_max)` when
  `cal_max > cal_min`, else `None`.

A missing file raises `FileNotFoundError`; every other problem raises [`MedicalImageError`] (a `ValueError`) that
names the file.

Example:

```python
>>> import numpy as np, nibabel as nib, os, tempfile
>>> from mic_diffrep.data.medical import read_medical_slices
>>> volume = np.zeros((4, 5, 3), dtype=np.float32)
>>> volume[1, 4, 1] = 1.0  # x = 1 (patient's left half), y = 4 (most anterior), z = 1
>>> path = os.path.join(tempfile.mkdtemp(), "brain.nii.gz")
>>> nib.Nifti1Image(volume, np.eye(4)).to_filename(path)
>>> slices = read_medical_slices(path)  # axial; slices 0 and 2 are all zero and skipped
>>> [(s.slice_index, s.num_slices, s.pixels.shape, s.window) for s in slices]
[(1, 3, (5, 4), None)]
>>> np.argwhere(slices[0].pixels == 1.0).tolist()  # row 0 = anterior; column 2 = x index 1 (right -> left)
[[0, 2]]

```
"""

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..models.mic_diffrep.preprocessing import MAX_VOXELS, has_dicom_preamble, is_medical_path


logger = logging.getLogger(__name__)


MEDICAL_EXTENSIONS = (".dcm", ".dicom", ".ima", ".nii", ".nii.gz")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")  # `.ima`: Siemens' name for its DICOM files
NIFTI_EXTENSIONS = (".nii", ".nii.gz")

PathLike = Union[str, "os.PathLike[str]"]

# Transfer syntax UID prefixes -> what to install so that pydicom can decode them.
_JPEG_HINT = "`pip install pylibjpeg pylibjpeg-libjpeg` (or `pip install python-gdcm`)"
_JPEG_LS_HINT = "`pip install pylibjpeg pylibjpeg-libjpeg` (or `pip install pyjpegls`, or `pip install python-gdcm`)"
_JPEG_2000_HINT = "`pip install pylibjpeg pylibjpeg-openjpeg` (or `pip install python-gdcm`)"
_RLE_HINT = "`pip install pylibjpeg pylibjpeg-rle`"
_DEFAULT_HINT = "`pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` (or `pip install python-gdcm`)"
_INSTALL_HINTS = {
    "1.2.840.10008.1.2.4.50": _JPEG_HINT,
    "1.2.840.10008.1.2.4.51": _JPEG_HINT,
    "1.2.840.10008.1.2.4.57": _JPEG_HINT,
    "1.2.840.10008.1.2.4.70": _JPEG_HINT,
    "1.2.840.10008.1.2.4.80": _JPEG_LS_HINT,
    "1.2.840.10008.1.2.4.81": _JPEG_LS_HINT,
    "1.2.840.10008.1.2.4.90": _JPEG_2000_HINT,
    "1.2.840.10008.1.2.4.91": _JPEG_2000_HINT,
    "1.2.840.10008.1.2.4.92": _JPEG_2000_HINT,
    "1.2.840.10008.1.2.4.93": _JPEG_2000_HINT,
    "1.2.840.10008.1.2.4.201": _JPEG_2000_HINT,
    "1.2.840.10008.1.2.4.202": _JPEG_2000_HINT,
    "1.2.840.10008.1.2.4.203": _JPEG_2000_HINT,
    "1.2.840.10008.1.2.5": _RLE_HINT,
}
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class MedicalImageError(ValueError):
    """A clinical image file that cannot be read into grey slices; the message names the file and the problem."""


@dataclass
class MedicalSlice:
    """One 2-D grey slice read from a DICOM or NIfTI file.

    Args:
        pixels (`np.ndarray`): 2-D float64 array of physical values (DICOM: after the Modality LUT / rescale
            slope and intercept), rows x columns as displayed.
        window (`Tuple[float, float]`, *optional*): `(low, high)` display window from the file, in the units of
            `pixels`; `None` when the file has none (the caller then uses a percentile window).
        slice_index (`int`, *optional*): index of the slice (NIfTI) or frame (DICOM) within the file; `None`
            for a single 2-D image.
        num_slices (`int`): how many slices (or frames) the file has along the slicing axis.
    """

    pixels: np.ndarray
    window: Optional[Tuple[float, float]]
    slice_index: Optional[int]
    num_slices: int


@dataclass(frozen=True)
class SliceSelection:
    """Which slices of a NIfTI volume become images (DICOM files always give all their frames).

    Everything that reads files takes one (`decode_images(..., slices=SliceSelection())`), and the command line
    sets it with `--slice_axis`, `--slice_range START STOP` and `--keep_empty_slices`.

    Args:
        slice_axis (`int`, defaults to 2): RAS+ axis to slice along (0 = sagittal, 1 = coronal, 2 = axial).
        slice_range (`Tuple[int, int]`, *optional*): `(start, stop)`; keeps `range(n)[start:stop]` of the slice
            indices along `slice_axis` (Python slicing: negative values count from the end, `None` is open).
        skip_empty_slices (`bool`, defaults to `True`): drop slices whose finite pixels are all equal (the empty
            slices around a skull-stripped brain).
    """

    slice_axis: int = 2
    slice_range: Optional[Tuple[int, int]] = None
    skip_empty_slices: bool = True

    def __post_init__(self):
        if isinstance(self.slice_axis, bool) or self.slice_axis not in (0, 1, 2):
            raise ValueError(f"`slice_axis` must be 0, 1 or 2 (RAS+ axes), got {self.slice_axis!r}.")
        if self.slice_range is not None:
            slice_range = tuple(self.slice_range)
            if len(slice_range) != 2 or not all(
                    v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in slice_range):
                raise ValueError(f"`slice_range` must be two integers START STOP, got {self.slice_range!r}.")
            start, stop = slice_range
            if stop == 0 or (start is not None and stop is not None and (start < 0) == (stop < 0) and start >= stop):
                raise ValueError(f"`slice_range` {start} {stop} keeps no slice of any volume: START must be below "
                                 f"STOP.")
            object.__setattr__(self, "slice_range", slice_range)

    def read(self, path: PathLike) -> List["MedicalSlice"]:
        """`read_medical_slices(path)` with these settings."""
        return read_medical_slices(path, slice_axis=self.slice_axis, slice_range=self.slice_range,
                                   skip_empty_slices=self.skip_empty_slices)


# The command-line flags of a `SliceSelection`, one name everywhere: dataclass settings (`--slice_axis`,
# `--slice_range START STOP`, `--keep_empty_slices`) and the plain argparse commands use these helps.
_SLICE_FLAG_WHAT = {
    "slice_axis": "DICOM / NIfTI: the RAS axis NIfTI volumes are cut along (0 sagittal, 1 coronal, 2 axial); every "
                  "slice (and every frame of a multi-frame DICOM) is one image.",
    "slice_range": "Two integers START STOP: keep slices START..STOP-1 of each NIfTI volume along --slice_axis "
                   "(Python slicing: negative values count from the end); a 2-D NIfTI keeps its one slice.",
    "keep_empty_slices": "Keep NIfTI slices whose pixels are all equal (the empty slices around a skull-stripped "
                         "brain)",
}
SLICE_FLAG_HELP = {
    "slice_axis": _SLICE_FLAG_WHAT["slice_axis"],
    "slice_range": _SLICE_FLAG_WHAT["slice_range"] + " Default: every slice.",
    "keep_empty_slices": _SLICE_FLAG_WHAT["keep_empty_slices"] + "; by default they are skipped.",
}


# The slice settings as pretrained folders and image processors record them (`slice_selection`'s keywords).
SLICE_SETTINGS = ("slice_axis", "slice_range", "keep_empty_slices")

# The settings of the commands that read images with a pretrained model (`extract`, `probe`): unset, they are the
# model's own, as it was pretrained (`inherit_slice_settings`).
PRETRAINED_SLICE_HELP = {
    "slice_axis": _SLICE_FLAG_WHAT["slice_axis"] + " Default: the axis the --pretrained model was pretrained on "
                                                   "(2 when it does not say).",
    "slice_range": _SLICE_FLAG_WHAT["slice_range"] + " Default: the --pretrained model's range, when the axis is its "
                                                     "own; else every slice.",
    "keep_empty_slices": _SLICE_FLAG_WHAT["keep_empty_slices"] + "; by default they are skipped, unless the "
                                                                 "--pretrained model was pretrained on them "
                                                                 "(`--keep_empty_slices false` skips them then).",
}


def inherit_slice_settings(slice_axis: Optional[int], slice_range: Optional[Sequence[int]],
                           keep_empty_slices: Optional[bool], recorded: Mapping) -> Dict:
    """The slice settings of a command that reads images with a pretrained model: those given (`None`: unset),
    else those the model was pretrained with (`recorded`: `slice_axis`, `slice_range`, `keep_empty_slices`, as
    its folder records them). Another axis than the model's leaves its range out, as the image processor does."""
    recorded_axis = recorded.get("slice_axis", 2)
    axis = recorded_axis if slice_axis is None else slice_axis
    if slice_range is None and axis == recorded_axis:
        slice_range = recorded.get("slice_range")
    return {"slice_axis": axis, "slice_range": None if slice_range is None else list(slice_range),
            "keep_empty_slices": bool(recorded.get("keep_empty_slices", False) if keep_empty_slices is None
                                      else keep_empty_slices)}


def slice_selection(slice_axis: int = 2, slice_range: Optional[Sequence[int]] = None,
                    keep_empty_slices: bool = False) -> SliceSelection:
    """The [`SliceSelection`] of the flags `--slice_axis`, `--slice_range START STOP` and `--keep_empty_slices`."""
    return SliceSelection(slice_axis=slice_axis, slice_range=None if slice_range is None else tuple(slice_range),
                          skip_empty_slices=not keep_empty_slices)


def add_slice_arguments(parser, unset: Optional[str] = None) -> None:
    """Adds `--slice_axis`, `--slice_range START STOP` and `--keep_empty_slices` to an `argparse` parser. With
    `unset` (a sentence saying where an unset flag's value comes from: a trained model's settings, a `--config`),
    the flags default to `None` and `--no_keep_empty_slices` turns the setting off."""
    if unset is None:
        parser.add_argument("--slice_axis", type=int, default=2, choices=(0, 1, 2), help=SLICE_FLAG_HELP["slice_axis"])
        parser.add_argument("--slice_range", type=int, nargs=2, default=None, metavar=("START", "STOP"),
                            help=SLICE_FLAG_HELP["slice_range"])
        parser.add_argument("--keep_empty_slices", action="store_true", help=SLICE_FLAG_HELP["keep_empty_slices"])
        return
    parser.add_argument("--slice_axis", type=int, default=None, choices=(0, 1, 2),
                        help=f"{_SLICE_FLAG_WHAT['slice_axis']} {unset}")
    parser.add_argument("--slice_range", type=int, nargs=2, default=None, metavar=("START", "STOP"),
                        help=f"{_SLICE_FLAG_WHAT['slice_range']} {unset}")
    parser.add_argument("--keep_empty_slices", action="store_const", const=True, default=None,
                        help=f"{_SLICE_FLAG_WHAT['keep_empty_slices']}. {unset}")
    parser.add_argument("--no_keep_empty_slices", dest="keep_empty_slices", action="store_const", const=False,
                        help="Skip NIfTI slices whose pixels are all equal.")


def is_medical_file(path: PathLike) -> bool:
    """Whether `path` has one of `MEDICAL_EXTENSIONS` (case-insensitive; `.nii.gz` included), or is a DICOM file
    named without an extension (`IM0001`; see `has_dicom_preamble`): `preprocessing.is_medical_path` for paths."""
    return is_medical_path(path)


def read_medical_slices(
    path: PathLike,
    slice_axis: int = 2,
    slice_range: Optional[Tuple[Optional[int], Optional[int]]] = None,
    skip_empty_slices: bool = True,
) -> List[MedicalSlice]:
    """Reads a DICOM (`.dcm`, `.dicom`, or no extension with a DICOM preamble) or NIfTI (`.nii`, `.nii.gz`) file
    into slices, chosen by extension.

    `slice_axis`, `slice_range` and `skip_empty_slices` apply to NIfTI volumes (see [`read_nifti`]); a DICOM file
    gives all its frames (see [`read_dicom`]).
    """
    name = str(os.fspath(path)).lower()
    if name.endswith(NIFTI_EXTENSIONS):
        return read_nifti(path, slice_axis=slice_axis, slice_range=slice_range, skip_empty_slices=skip_empty_slices)
    if name.endswith(DICOM_EXTENSIONS) or has_dicom_preamble(path):
        return read_dicom(path)
    raise MedicalImageError(
        f"{os.fspath(path)}: not a recognised medical image file; expected one of the extensions "
        f"{', '.join(MEDICAL_EXTENSIONS)}."
    )


def patient_keys(path: PathLike) -> List[str]:
    """What ties an image file to the other files of its patient, for splits that keep a patient on one side: a DICOM
    file's *PatientID* and *SeriesInstanceUID* (its header alone is read; an empty value, or a file that cannot be
    read, gives none), and the subject of a BIDS-named file (`sub-01_T1w.nii.gz`: `sub-01`).

    >>> patient_keys("/data/glioma/sub-07_ses-1_FLAIR.nii.gz")
    ['bids:sub-07']
    """
    filename = os.fspath(path)
    keys = [f"bids:{match.group(1)}" for match in [_BIDS_SUBJECT.match(os.path.basename(filename))] if match]
    name = filename.lower()
    if not (name.endswith(DICOM_EXTENSIONS) or (not name.endswith(NIFTI_EXTENSIONS) and has_dicom_preamble(path))):
        return keys
    try:
        import pydicom

        ds = pydicom.dcmread(filename, stop_before_pixels=True, specific_tags=["PatientID", "SeriesInstanceUID"],
                             force=True)
    except Exception:  # noqa: BLE001 - an unreadable file is reported when its pixels are read
        return keys
    for keyword in ("PatientID", "SeriesInstanceUID"):
        value = str(ds.get(keyword, "") or "").strip()
        if value:
            keys.append(f"dicom-{keyword}:{value}")
    return keys


_BIDS_SUBJECT = re.compile(r"(sub-[A-Za-z0-9]+)_")  # BIDS: a file name starts with its subject


# --------------------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------------------


def read_dicom(path: PathLike) -> List[MedicalSlice]:
    """Reads a grey-level DICOM file with `pydicom`: one [`MedicalSlice`] per frame.

    Pixels go through the Modality LUT (rescale slope / intercept), the window comes from *WindowCenter* /
    *WindowWidth* as `(c - w / 2, c + w / 2)`, and MONOCHROME1 is inverted to read like MONOCHROME2 (see the
    module docstring for the exact rules).

    Raises:
        `MedicalImageError`: pydicom is missing, the file is not (complete) DICOM, has no pixel data, is colour,
            or uses a compressed transfer syntax that no installed plugin decodes.
    """
    filename = os.fspath(path)
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut
    except ImportError as err:
        raise MedicalImageError(f"{filename}: reading DICOM files needs pydicom: `pip install pydicom`.") from err

    try:
        try:
            ds = pydicom.dcmread(filename)
        except pydicom.errors.InvalidDicomError:
            if not filename.lower().endswith(DICOM_EXTENSIONS):
                raise
            # Named as DICOM but without the preamble and file meta of DICOM Part 10 (older exports): read its
            # data elements as they are; a file that is not DICOM at all has no pixel data (refused below).
            ds = pydicom.dcmread(filename, force=True)
            if not any(keyword in ds for keyword in _PIXEL_DATA_KEYWORDS):
                raise MedicalImageError(f"{filename}: not a readable DICOM file (truncated, corrupt or not DICOM): "
                                        f"no DICOM header ('DICM' prefix) and no pixel data.")
            if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):  # the encoding it was read in
                implicit_vr, little_endian = ds.original_encoding
                ds.file_meta = pydicom.dataset.FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = (
                    pydicom.uid.ImplicitVRLittleEndian if implicit_vr
                    else pydicom.uid.ExplicitVRLittleEndian if little_endian else pydicom.uid.ExplicitVRBigEndian)
    except (FileNotFoundError, MedicalImageError):
        raise
    except Exception as err:
        raise MedicalImageError(
            f"{filename}: not a readable DICOM file (truncated, corrupt or not DICOM): {err}"
        ) from err

    if not any(keyword in ds for keyword in _PIXEL_DATA_KEYWORDS):
        raise MedicalImageError(
            f"{filename}: the DICOM file has no pixel data (it may be truncated, or a non-image object such as a "
            "structured report or presentation state)."
        )

    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    samples_per_pixel = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or samples_per_pixel != 1:
        raise MedicalImageError(
            f"{filename}: only grey-level DICOM images are supported (PhotometricInterpretation MONOCHROME1 or "
            f"MONOCHROME2 with SamplesPerPixel 1); this file has PhotometricInterpretation "
            f"{photometric or '(missing)'!r} and SamplesPerPixel {samples_per_pixel}. Convert colour images to "
            "grey first."
        )

    num_frames = int(ds.get("NumberOfFrames", 1) or 1)
    voxels = num_frames * int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
    if voxels > MAX_VOXELS:  # compressed frames can claim gigabytes from a small file: refused before decoding
        raise MedicalImageError(f"{filename}: its header gives {num_frames} frame(s) of {ds.get('Rows')} x "
                                f"{ds.get('Columns')} ({voxels:,} pixels), more than the {MAX_VOXELS:,} read from "
                                f"one file.")
    stored = _decode_dicom_pixels(ds, filename)
    frames = stored if num_frames > 1 else stored[None]
    if frames.ndim != 3 or frames.shape[0] != num_frames:
        raise MedicalImageError(
            f"{filename}: decoded pixel array has shape {tuple(stored.shape)}, which does not match "
            f"NumberOfFrames={num_frames} of grey images."
        )

    is_float = "PixelData" not in ds
    slices = []
    for index, frame in enumerate(frames):
        modality = _dicom_module(
            ds, index, "PixelValueTransformationSequence", ("RescaleSlope", "ModalityLUTSequence")
        )
        pixels = np.asarray(apply_modality_lut(frame, modality), dtype=np.float64)
        voi = _dicom_module(ds, index, "FrameVOILUTSequence", ("WindowCenter",))
        window = _dicom_window(voi)
        if photometric == "MONOCHROME1":
            if is_float or "BitsStored" not in ds:
                low_high = np.array([np.nanmin(pixels), np.nanmax(pixels)])
            else:
                bits = int(ds.BitsStored)
                signed = int(ds.get("PixelRepresentation", 0)) == 1
                extremes = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1])
                low_high = np.asarray(apply_modality_lut(extremes, modality), dtype=np.float64)
            pivot = float(low_high.min() + low_high.max())
            pixels = pivot - pixels
            if window is not None:
                window = (pivot - window[1], pivot - window[0])
        slices.append(
            MedicalSlice(
                pixels=np.ascontiguousarray(pixels),
                window=window,
                slice_index=index if num_frames > 1 else None,
                num_slices=num_frames,
            )
        )
    return slices


def _decode_dicom_pixels(ds: Any, filename: str) -> np.ndarray:
    """`ds.pixel_array`, with errors (missing decoder plugin, truncated data) turned into `MedicalImageError`."""
    file_meta = getattr(ds, "file_meta", None)
    transfer_syntax = getattr(file_meta, "TransferSyntaxUID", None) if file_meta is not None else None
    compressed = bool(transfer_syntax is not None and transfer_syntax.is_compressed)
    if compressed:
        syntax = f"{transfer_syntax.name} ({transfer_syntax})"
        hint = _INSTALL_HINTS.get(str(transfer_syntax), _DEFAULT_HINT)
        try:
            from pydicom.pixels import get_decoder

            decoder = get_decoder(transfer_syntax)
        except (NotImplementedError, ValueError) as err:
            raise MedicalImageError(
                f"{filename}: pydicom has no decoder for the transfer syntax {syntax}; convert the file to an "
                "uncompressed transfer syntax (e.g. `gdcmconv --raw` or `dcmdjpeg`)."
            ) from err
        if not decoder.is_available:
            raise MedicalImageError(
                f"{filename}: the pixel data are compressed with transfer syntax {syntax}, which pydicom cannot "
                f"decode without a plugin: {hint}."
            )
    pydicom_logger = logging.getLogger("pydicom")
    disabled, pydicom_logger.disabled = pydicom_logger.disabled, True  # its traceback of the error raised below
    try:
        return np.asarray(ds.pixel_array)
    except Exception as err:
        reason = " ".join(str(err).split()) or type(err).__name__  # one line: a decoder lists its plugins on several
        if compressed:
            raise MedicalImageError(
                f"{filename}: could not decode pixel data compressed with transfer syntax {syntax} (the data may "
                f"be corrupt, or need another decoder: {hint}): {reason}"
            ) from err
        raise MedicalImageError(
            f"{filename}: could not read the pixel data (the file may be truncated or corrupt): {reason}"
        ) from err
    finally:
        pydicom_logger.disabled = disabled


def _dicom_module(ds: Any, frame: int, sequence: str, top_level_keywords: Tuple[str, ...]) -> Any:
    """The dataset holding a module for `frame`: `ds` itself when it has the module's attributes at top level,
    else the item of an enhanced multi-frame functional group (per-frame first, then shared), else `ds`."""
    if any(keyword in ds for keyword in top_level_keywords):
        return ds
    for groups_keyword, item_index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = ds.get(groups_keyword)
        if groups and len(groups) > item_index:
            items = groups[item_index].get(sequence)
            if items:
                return items[0]
    return ds


def _first_value(value: Any) -> Optional[float]:
    if value is None:
        return None
    if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _dicom_window(ds: Any) -> Optional[Tuple[float, float]]:
    center = _first_value(ds.get("WindowCenter"))
    width = _first_value(ds.get("WindowWidth"))
    if center is None or width is None or not np.isfinite([center, width]).all() or width <= 0:
        return None
    return (center - width / 2.0, center + width / 2.0)


# --------------------------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------------------------


def read_nifti(
    path: PathLike,
    slice_axis: int = 2,
    slice_range: Optional[Tuple[Optional[int], Optional[int]]] = None,
    skip_empty_slices: bool = True,
) -> List[MedicalSlice]:
    """Reads a NIfTI file (`.nii` or `.nii.gz`) with `nibabel` into display-oriented slices.

    Args:
        path: the file.
        slice_axis (`int`, defaults to 2): RAS+ axis to slice along after `nibabel.as_closest_canonical`
            (0 = sagittal, 1 = coronal, 2 = axial).
        slice_range (`Tuple[int, int]`, *optional*): `(start, stop)`; keeps `range(n)[start:stop]` of the slice
            indices along `slice_axis` (after reorientation). A single-slice image keeps its one slice.
        skip_empty_slices (`bool`, defaults to `True`): drop slices whose finite pixels are all equal.

    Each slice is displayed as `np.fliplr(np.flipud(slice.T))`, the radiological convention of DICOM: axial
    slices have anterior at the top and the patient's right on the image's left (see the module docstring). 4-D
    files use their first volume.

    Raises:
        `MedicalImageError`: nibabel is missing, the file is truncated / corrupt, has an unsupported shape, or no
            slice is left after `slice_range` and `skip_empty_slices`.
    """
    filename = os.fspath(path)
    try:
        import nibabel
    except ImportError as err:
        raise MedicalImageError(f"{filename}: reading NIfTI files needs nibabel: `pip install nibabel`.") from err
    if slice_axis not in (0, 1, 2):
        raise MedicalImageError(f"{filename}: `slice_axis` must be 0, 1 or 2 (RAS+ axes), got {slice_axis!r}.")
    if slice_range is not None and len(tuple(slice_range)) != 2:
        raise MedicalImageError(f"{filename}: `slice_range` must be a (start, stop) pair, got {slice_range!r}.")

    try:
        image = nibabel.load(filename)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise MedicalImageError(f"{filename}: not a readable NIfTI file (truncated or corrupt?): {err}") from err

    window = _nifti_window(image.header)
    dtype = image.get_data_dtype()
    if dtype.kind == "c" or dtype.fields is not None:
        raise MedicalImageError(
            f"{filename}: {'complex-valued' if dtype.kind == 'c' else 'colour (RGB)'} NIfTI data ({dtype}) is not "
            f"supported; save one grey value per voxel (e.g. the magnitude image)."
        )
    shape = tuple(int(n) for n in image.shape)
    if len(shape) < 2 or (len(shape) > 4 and any(n != 1 for n in shape[4:])):
        raise MedicalImageError(
            f"{filename}: expected a 2-D image, 3-D volume or 4-D series of volumes, got data of shape {shape}."
        )
    voxels = int(np.prod(shape[:3], dtype=np.int64))  # of the one volume read
    if voxels > MAX_VOXELS:  # a corrupt header: refused before memory runs out
        raise MedicalImageError(f"{filename}: its header gives a volume of shape {shape[:3]} ({voxels:,} voxels), more "
                                f"than the {MAX_VOXELS:,} read from one file: a corrupt header?")
    offset = int(getattr(image.dataobj, "offset", 0) or 0)  # where the data starts, after the header
    data_bytes = voxels * dtype.itemsize  # of the first volume, the one read
    if filename.lower().endswith(".nii") and os.path.getsize(filename) < offset + data_bytes:  # read as it is
        raise MedicalImageError(f"{filename}: its header gives a volume of shape {shape[:3]} ({data_bytes:,} bytes), "
                                f"more than the file's {os.path.getsize(filename):,} bytes: truncated or corrupt.")
    try:
        if len(shape) == 2:
            # `as_closest_canonical` needs three spatial axes: a 2-D image is one slice along voxel axis 2.
            data = np.asarray(image.get_fdata(dtype=np.float64))[..., None]
            image = nibabel.Nifti1Image(data, image.affine)
        elif len(shape) > 3:
            if shape[3] > 1:
                logger.warning("%s: a series of %d volumes; only the first (t = 0) is read.", filename, shape[3])
            image = image.slicer[(slice(None),) * 3 + (0,) * (len(shape) - 3)]  # the first volume (t = 0)
        canonical = nibabel.as_closest_canonical(image)
        volume = np.asarray(canonical.get_fdata(dtype=np.float64))
    except Exception as err:
        reason = " ".join(str(err).split()) or type(err).__name__  # a MemoryError says nothing itself
        raise MedicalImageError(
            f"{filename}: could not read the NIfTI data (the file may be truncated or corrupt): {reason}"
        ) from err

    # A single-slice image (2-D file, or one spatial axis of length 1) is cut across that axis.
    single_axes = [axis for axis in range(3) if volume.shape[axis] == 1]
    if volume.shape[slice_axis] == 1:
        axis, single_image = slice_axis, True
    elif len(single_axes) == 1:
        axis, single_image = single_axes[0], True
    else:
        axis, single_image = slice_axis, False
    num_slices = int(volume.shape[axis])
    start, stop = tuple(slice_range) if slice_range is not None and not single_image else (None, None)
    indices = range(num_slices)[slice(start, stop)]

    slices, skipped = [], 0
    for index in indices:
        # Rows: +b at the top; columns: +a on the left (radiological, as DICOM's LPS display).
        # A view of the slice (basic indexing): `np.take` copied the whole volume for each slice (nibabel's arrays
        # are Fortran-ordered), so reading a volume took time quadratic in its number of slices.
        pixels = np.ascontiguousarray(np.fliplr(np.flipud(volume[(slice(None),) * axis + (index,)].T)))
        if skip_empty_slices and _is_constant(pixels):
            skipped += 1
            continue
        slices.append(
            MedicalSlice(
                pixels=pixels,
                window=window,
                slice_index=None if single_image else int(index),
                num_slices=num_slices,
            )
        )
    if not slices:
        raise MedicalImageError(
            f"{filename}: no slice left: {num_slices} slice(s) along RAS axis {axis}, {len(indices)} kept by "
            f"slice_range={slice_range!r}, {skipped} dropped by skip_empty_slices=True (all pixels equal)."
        )
    return slices


def _is_constant(pixels: np.ndarray) -> bool:
    finite = pixels[np.isfinite(pixels)]
    return finite.size == 0 or float(finite.min()) == float(finite.max())


def _nifti_window(header: Any) -> Optional[Tuple[float, float]]:
    try:
        cal_min, cal_max = float(header["cal_min"]), float(header["cal_max"])
    except (KeyError, TypeError, ValueError):
        return None
    if np.isfinite([cal_min, cal_max]).all() and cal_max > cal_min:
        return (cal_min, cal_max)
    return None
