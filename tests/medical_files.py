"""Small synthetic DICOM and NIfTI files for the tests, written with pydicom and nibabel (imported on use, so a test
module can `pytest.importorskip` them first)."""

import os

import numpy as np


def write_dicom(path, frames, bits_stored: int = 16, photometric: str = "MONOCHROME2", transfer_syntax=None,
                fragments=None, **attributes) -> str:
    """A minimal MR Image Storage file of unsigned grey pixels, 16 bits allocated and `bits_stored` stored; one frame,
    or several when `frames` is 3-D. `fragments`: encapsulated compressed bytes to store instead of `frames`' bytes,
    for a compressed `transfer_syntax` (default: explicit VR little endian). Other keywords set DICOM attributes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    frames = np.asarray(frames, dtype="<u2")
    file_meta = FileMetaDataset()
    file_meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    file_meta.MediaStorageSOPClassUID = MRImageStorage
    file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Rows, ds.Columns = frames.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if frames.ndim == 3:
        ds.NumberOfFrames = frames.shape[0]
    if fragments is None:
        ds.PixelData = frames.tobytes()
    else:
        ds.PixelData = encapsulate(fragments)
        ds["PixelData"].VR = "OB"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def write_nifti(path, array, affine=None, **header) -> str:
    """A NIfTI-1 file of `array` (voxel order x, y, z) with `affine` (default identity) and header fields."""
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine)
    for key, value in header.items():
        image.header[key] = value
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    image.to_filename(str(path))
    return str(path)
