"""Tests for `mic_diffrep.data.medical`: small DICOM / NIfTI files written here with pydicom and nibabel."""

import gzip

import numpy as np
import pytest

from mic_diffrep.data.medical import (
    MEDICAL_EXTENSIONS,
    MedicalImageError,
    MedicalSlice,
    is_medical_file,
    read_dicom,
    read_medical_slices,
    read_nifti,
)


pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

import medical_files  # noqa: E402
from medical_files import write_nifti  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless  # noqa: E402


def write_dicom(path, frames, **kwargs):
    """A synthetic MR file with 12 of its 16 bits stored, as most MR scanners write them."""
    return medical_files.write_dicom(path, frames, bits_stored=12, **kwargs)


STORED = np.arange(12, dtype=np.uint16).reshape(3, 4) * 100  # 0 .. 1100, within 12 bits


# ----------------------------------------------------------------------------------------------------------- API


def test_is_medical_file_by_extension():
    assert MEDICAL_EXTENSIONS == (".dcm", ".dicom", ".ima", ".nii", ".nii.gz")
    for name in ("a.dcm", "B.DCM", "c.dicom", "d.nii", "e.NII.GZ", "dir.x/f.nii.gz"):
        assert is_medical_file(name), name
    for name in ("a.png", "b.gz", "c.tar.gz", "d.nii.bak", "dcm"):
        assert not is_medical_file(name), name


def test_unknown_extension_refused(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG")
    with pytest.raises(MedicalImageError, match="image.png"):
        read_medical_slices(path)


# --------------------------------------------------------------------------------------------------------- DICOM


def test_dicom_rescale_and_window(tmp_path):
    path = write_dicom(
        tmp_path / "ct.dcm",
        STORED,
        RescaleSlope=2.0,
        RescaleIntercept=-1024.0,
        WindowCenter=[40, 400],
        WindowWidth=[400, 2000],
    )
    (item,) = read_medical_slices(path)
    assert isinstance(item, MedicalSlice)
    assert item.pixels.dtype == np.float64 and item.pixels.shape == (3, 4)
    np.testing.assert_allclose(item.pixels, STORED * 2.0 - 1024.0)
    assert item.window == pytest.approx((40 - 200, 40 + 200))  # first of the multi-valued centre / width
    assert item.slice_index is None and item.num_slices == 1


def test_dicom_without_window_or_rescale(tmp_path):
    (item,) = read_dicom(write_dicom(tmp_path / "plain.dicom", STORED))
    np.testing.assert_array_equal(item.pixels, STORED.astype(np.float64))
    assert item.window is None


def test_dicom_monochrome1_inverted(tmp_path):
    path = write_dicom(tmp_path / "m1.dcm", STORED, photometric="MONOCHROME1", WindowCenter=300, WindowWidth=200)
    (item,) = read_dicom(path)
    # Reflected about the 12-bit range [0, 4095]: the lowest stored value is now the brightest.
    np.testing.assert_allclose(item.pixels, 4095.0 - STORED)
    assert item.pixels.argmax() == STORED.argmin()
    assert item.window == pytest.approx((4095 - 400, 4095 - 200))
    # The inverted window still selects the same pixels.
    (m2,) = read_dicom(write_dicom(tmp_path / "m2.dcm", STORED, WindowCenter=300, WindowWidth=200))
    inside_m1 = (item.pixels >= item.window[0]) & (item.pixels <= item.window[1])
    inside_m2 = (m2.pixels >= m2.window[0]) & (m2.pixels <= m2.window[1])
    np.testing.assert_array_equal(inside_m1, inside_m2)


def test_dicom_multi_frame(tmp_path):
    frames = np.stack([STORED + 10 * k for k in range(3)])
    slices = read_dicom(write_dicom(tmp_path / "multi.dcm", frames, RescaleSlope=1.0, RescaleIntercept=5.0))
    assert len(slices) == 3
    assert [s.slice_index for s in slices] == [0, 1, 2]
    assert all(s.num_slices == 3 for s in slices)
    for k, item in enumerate(slices):
        np.testing.assert_allclose(item.pixels, STORED + 10 * k + 5.0)


def test_dicom_enhanced_functional_groups(tmp_path):
    # Enhanced multi-frame MR keeps rescale / window in the functional groups, not at top level.
    def item(**kw):
        ds = Dataset()
        for keyword, value in kw.items():
            setattr(ds, keyword, value)
        return ds

    frames = np.stack([STORED, STORED])
    shared = item(PixelValueTransformationSequence=[item(RescaleSlope=0.5, RescaleIntercept=1.0, RescaleType="US")])
    per_frame = [item(FrameVOILUTSequence=[item(WindowCenter=100 * (k + 1), WindowWidth=50)]) for k in range(2)]
    path = write_dicom(
        tmp_path / "enhanced.dcm",
        frames,
        SharedFunctionalGroupsSequence=[shared],
        PerFrameFunctionalGroupsSequence=per_frame,
    )
    slices = read_dicom(path)
    for k, item_ in enumerate(slices):
        np.testing.assert_allclose(item_.pixels, STORED * 0.5 + 1.0)
        assert item_.window == pytest.approx((100 * (k + 1) - 25, 100 * (k + 1) + 25))


def test_dicom_rgb_refused(tmp_path):
    path = write_dicom(tmp_path / "colour.dcm", STORED, photometric="RGB")
    with pytest.raises(MedicalImageError, match="colour.dcm") as info:
        read_dicom(path)
    assert "RGB" in str(info.value)


def test_dicom_samples_per_pixel_refused(tmp_path):
    path = write_dicom(tmp_path / "spp.dcm", STORED, SamplesPerPixel=3)
    with pytest.raises(MedicalImageError, match="SamplesPerPixel 3"):
        read_dicom(path)


@pytest.mark.parametrize("transfer_syntax", [JPEG2000Lossless, JPEGLSLossless], ids=["jpeg2000", "jpeg-ls"])
def test_dicom_compressed_refused_or_decoded(tmp_path, transfer_syntax):
    path = tmp_path / "compressed.dcm"
    fragments = [b"\xff\x4f\xff\x51" + bytes(20)]  # not a valid codestream
    write_dicom(path, STORED, transfer_syntax=transfer_syntax, fragments=fragments)
    try:
        (item,) = read_dicom(path)
    except MedicalImageError as err:  # the expected outcome: a clear message, not a bare traceback
        message = str(err)
        assert "compressed.dcm" in message
        assert transfer_syntax.name in message or str(transfer_syntax) in message
        assert "pip install" in message
    else:  # a plugin happened to decode it
        assert item.pixels.shape == (3, 4)


def test_dicom_compressed_without_plugin_names_install(tmp_path):
    from pydicom.pixels import get_decoder

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed")
    path = tmp_path / "jls.dcm"
    write_dicom(path, STORED, transfer_syntax=JPEGLSLossless, fragments=[bytes(24)])
    with pytest.raises(MedicalImageError, match=r"jls\.dcm.*JPEG-LS.*pip install pylibjpeg pylibjpeg-libjpeg"):
        read_dicom(path)


def test_dicom_truncated_names_file(tmp_path):
    full = write_dicom(tmp_path / "full.dcm", STORED)
    data = open(full, "rb").read()
    for name, size in (("cut_pixels.dcm", len(data) - 8), ("cut_header.dcm", 100), ("cut_tiny.dcm", 10)):
        path = tmp_path / name
        path.write_bytes(data[:size])
        with pytest.raises(MedicalImageError, match=name.replace(".", r"\.")):
            read_dicom(path)


def test_not_dicom_names_file(tmp_path):
    path = tmp_path / "text.dcm"
    path.write_text("hello, not DICOM")
    with pytest.raises(MedicalImageError, match=r"text\.dcm"):
        read_medical_slices(path)


def test_dicom_named_so_without_the_part_10_header_and_siemens_ima_files_are_read(tmp_path):
    """A `.dcm` of an older export (no preamble or file meta) failed with pydicom's "Use force=True to force
    reading", which a command-line user cannot act on; Siemens `.IMA` files were left out of folders."""
    full = pydicom.dcmread(write_dicom(tmp_path / "full.dcm", STORED))
    del full.file_meta
    full.preamble = None
    for name in ("old.dcm", "SCAN.0001.IMA"):
        pydicom.dcmwrite(tmp_path / name, full, enforce_file_format=False, implicit_vr=True, little_endian=True)
        assert open(tmp_path / name, "rb").read(132)[128:] != b"DICM" and is_medical_file(tmp_path / name)
        (item,) = read_medical_slices(tmp_path / name)
        np.testing.assert_array_equal(item.pixels, STORED)
    (tmp_path / "notes.ima").write_text("hello, not DICOM")
    with pytest.raises(MedicalImageError, match=r"notes\.ima: not a readable DICOM file .*no DICOM header"):
        read_medical_slices(tmp_path / "notes.ima")


@pytest.mark.parametrize("dtype, what", [(np.complex64, "complex-valued"),
                                         (np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]), r"colour \(RGB\)")])
def test_complex_and_colour_nifti_are_refused_by_name(tmp_path, dtype, what):
    """A complex NIfTI lost its imaginary part with only numpy's ComplexWarning; an RGB24 one failed with "The
    DTypes VoidDType and Float64DType..."."""
    path = tmp_path / "odd.nii.gz"
    nib.Nifti1Image(np.ones((4, 4, 2), dtype=dtype), np.eye(4)).to_filename(path)
    with pytest.raises(MedicalImageError, match=rf"odd\.nii\.gz: {what} NIfTI data .* not supported"):
        read_medical_slices(path)


def test_dicom_without_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "nopix.dcm", STORED)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(MedicalImageError, match=r"nopix\.dcm.*no pixel data"):
        read_dicom(path)


# --------------------------------------------------------------------------------------------------------- NIfTI


def test_nifti_2d_is_one_slice(tmp_path):
    array = np.arange(12, dtype=np.float32).reshape(3, 4)  # (x, y)
    (item,) = read_medical_slices(write_nifti(tmp_path / "flat.nii", array))
    assert item.slice_index is None and item.num_slices == 1 and item.window is None
    # (y, x): anterior (high y) at the top, patient right (high x) on the left, as DICOM displays it.
    np.testing.assert_array_equal(item.pixels, np.fliplr(np.flipud(array.T)))


def test_a_single_slice_nifti_keeps_its_slice_whatever_the_slice_range(tmp_path):
    """A model probed with `--slice_range 1 3` refused every 2-D NIfTI ("no slice left"), while a 2-D DICOM of the
    same slice was read."""
    array = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    for name, data in (("flat.nii", array), ("one.nii.gz", array[:, :, None])):
        (item,) = read_medical_slices(write_nifti(tmp_path / name, data), slice_range=(1, 3))
        assert item.slice_index is None
        np.testing.assert_array_equal(item.pixels, np.fliplr(np.flipud(array.T)))


def test_nifti_3d_slices_range_and_empty(tmp_path):
    volume = np.zeros((3, 4, 5), dtype=np.int16)
    for z in (1, 2, 3):
        volume[:, :, z] = np.arange(12).reshape(3, 4) + 100 * z
    path = write_nifti(tmp_path / "vol.nii.gz", volume)

    everything = read_nifti(path, skip_empty_slices=False)
    assert [s.slice_index for s in everything] == [0, 1, 2, 3, 4]
    assert all(s.num_slices == 5 and s.pixels.shape == (4, 3) and s.pixels.dtype == np.float64 for s in everything)
    for item in everything:
        np.testing.assert_array_equal(item.pixels, np.fliplr(np.flipud(volume[:, :, item.slice_index].T)))

    assert [s.slice_index for s in read_nifti(path)] == [1, 2, 3]  # all-zero slices 0 and 4 dropped
    assert [s.slice_index for s in read_medical_slices(path, slice_range=(2, 5))] == [2, 3]
    assert [s.slice_index for s in read_nifti(path, slice_range=(0, 2), skip_empty_slices=False)] == [0, 1]
    assert [s.slice_index for s in read_nifti(path, slice_range=(-2, None), skip_empty_slices=False)] == [3, 4]
    sagittal = read_nifti(path, slice_axis=0)
    assert [s.slice_index for s in sagittal] == [0, 1, 2] and sagittal[0].pixels.shape == (5, 4)


def test_nifti_window_from_cal_min_max(tmp_path):
    volume = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    slices = read_nifti(write_nifti(tmp_path / "cal.nii", volume, cal_min=2.0, cal_max=20.0))
    assert all(s.window == (2.0, 20.0) for s in slices)


def test_nifti_4d_uses_first_volume(tmp_path, caplog):
    series = np.zeros((2, 3, 2, 3), dtype=np.float32)
    series[..., 0] = 1.0
    series[0, 0, :, 0] = 7.0
    series[..., 1:] = 50.0
    with caplog.at_level("WARNING"):
        slices = read_nifti(write_nifti(tmp_path / "series.nii.gz", series))
    assert len(slices) == 2
    assert all(s.pixels.max() == 7.0 for s in slices)
    assert "a series of 3 volumes; only the first (t = 0) is read" in caplog.text  # said, not silent


def test_nifti_orientation_independent_of_storage(tmp_path):
    # Marker at voxel (x=1, y=3, z=2) of a 4 x 5 x 3 RAS volume: left half, near the front.
    ras = np.zeros((4, 5, 3), dtype=np.float32)
    ras[1, 3, 2] = 1.0
    ras[:, :, 1] = 0.5  # a non-empty slice elsewhere
    path_ras = write_nifti(tmp_path / "ras.nii", ras, np.diag([2.0, 2.0, 3.0, 1.0]))

    # Same anatomy stored LAS (x axis negated, data flipped along x), and with x/y swapped and y flipped.
    flipped_affine = np.diag([-2.0, 2.0, 3.0, 1.0])
    flipped_affine[0, 3] = 2.0 * (ras.shape[0] - 1)
    path_las = write_nifti(tmp_path / "las.nii.gz", ras[::-1], flipped_affine)
    swapped = np.transpose(ras, (1, 0, 2))[::-1]  # voxel axis 0 = y (reversed), axis 1 = x
    swapped_affine = np.array(
        [[0.0, 2.0, 0.0, 0.0], [-2.0, 0.0, 0.0, 2.0 * (ras.shape[1] - 1)], [0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )
    path_pas = write_nifti(tmp_path / "pas.nii", swapped, swapped_affine)

    results = [read_nifti(path, slice_range=(2, 3)) for path in (path_ras, path_las, path_pas)]
    for (item,) in results:
        assert item.slice_index == 2 and item.pixels.shape == (5, 4)
        # Rows from anterior (y = 4) at the top to posterior (y = 0): y = 3 is row 1. Columns radiological, from
        # patient right (x = 3) on the left to patient left (x = 0) on the right: x = 1 is column 2.
        assert np.argwhere(item.pixels == 1.0).tolist() == [[1, 2]]
        np.testing.assert_array_equal(item.pixels, results[0][0].pixels)


def test_nifti_display_is_radiological_for_every_axis(tmp_path):
    # Marker near the patient's right (x = 3 of 0..3), front (y = 4 of 0..4) and top (z = 2 of 0..2).
    volume = np.zeros((4, 5, 3), dtype=np.float32)
    volume[3, 4, 2] = 1.0
    path = write_nifti(tmp_path / "marker.nii", volume)
    expected = {
        2: (2, [[0, 0]]),  # axial slice z = 2: anterior at the top, patient right on the left
        1: (4, [[0, 0]]),  # coronal slice y = 4: superior at the top, patient right on the left
        0: (3, [[0, 0]]),  # sagittal slice x = 3: superior at the top, anterior on the left
    }
    for axis, (index, where) in expected.items():
        (item,) = read_nifti(path, slice_axis=axis)
        assert item.slice_index == index
        assert np.argwhere(item.pixels == 1.0).tolist() == where, axis
    # The opposite corner (patient left, back, bottom) lands bottom-right in every view.
    volume = np.zeros((4, 5, 3), dtype=np.float32)
    volume[0, 0, 0] = 1.0
    path = write_nifti(tmp_path / "corner.nii", volume)
    for axis in (0, 1, 2):
        (item,) = read_nifti(path, slice_axis=axis)
        rows, cols = item.pixels.shape
        assert np.argwhere(item.pixels == 1.0).tolist() == [[rows - 1, cols - 1]], axis


def test_nifti_zero_slices_left(tmp_path):
    path = write_nifti(tmp_path / "empty.nii.gz", np.zeros((2, 3, 4), dtype=np.uint8))
    with pytest.raises(MedicalImageError, match=r"empty\.nii\.gz.*no slice left"):
        read_nifti(path)
    volume = np.ones((2, 3, 4), dtype=np.uint8)
    volume[0, 0, :] = 2
    with pytest.raises(MedicalImageError, match=r"range\.nii.*no slice left"):
        read_nifti(write_nifti(tmp_path / "range.nii", volume), slice_range=(10, 20))


@pytest.mark.parametrize("name", ["cut.nii", "cut.nii.gz"])
def test_nifti_truncated_names_file(tmp_path, name):
    volume = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    full = write_nifti(tmp_path / f"full_{name}", volume)
    data = open(full, "rb").read()
    if name.endswith(".gz"):
        data = gzip.compress(gzip.decompress(data)[:600])  # valid gzip, truncated image inside
    else:
        data = data[:600]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(MedicalImageError, match=name.replace(".", r"\.")):
        read_medical_slices(path)


def test_a_nifti_header_giving_a_huge_volume_is_refused_before_reading_it(tmp_path):
    """A 1.4 KB .nii whose header gave 2000 x 2000 x 500 voxels took 4.4 GB of memory and 20 s to fail; one of
    30000 x 30000 x 3000 ran out of memory, its message ending in an empty colon."""
    full = write_nifti(tmp_path / "small.nii", np.ones((4, 5, 6), dtype=np.int16))
    image = nib.load(full)
    for name, shape, message in (("big.nii", (1000, 1000, 500), r"\(1,000,000,000 bytes\), more than the "
                                                                  r"file's 592 bytes: truncated"),
                                 ("huge.nii.gz", (30000, 30000, 3000), r"2,700,000,000,000 voxels\), more than")):
        header = image.header.copy()
        header.set_data_shape(shape)
        path = tmp_path / name
        raw = header.binaryblock + b"\0" * 4 + np.ones((4, 5, 6), dtype=np.int16).tobytes()
        path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
        with pytest.raises(MedicalImageError, match=rf"{name.replace('.', chr(92) + '.')}: .*{message}"):
            read_medical_slices(path)
    # a series of volumes cut after its first, the one read, is still read
    volume = np.random.default_rng(0).integers(1, 100, (4, 5, 6), dtype=np.int16)
    series = write_nifti(tmp_path / "series.nii", np.stack([volume, volume, volume], axis=-1))
    first_volume_end = nib.load(series).dataobj.offset + volume.nbytes
    (tmp_path / "cut_series.nii").write_bytes(open(series, "rb").read()[:first_volume_end])
    assert len(read_medical_slices(tmp_path / "cut_series.nii")) == len(read_medical_slices(series))


def test_nifti_bad_slice_axis(tmp_path):
    path = write_nifti(tmp_path / "axis.nii", np.ones((2, 2, 2), dtype=np.float32))
    with pytest.raises(MedicalImageError, match=r"axis\.nii.*slice_axis"):
        read_nifti(path, slice_axis=3)


def test_reading_a_volume_copies_each_slice_not_the_whole_volume(tmp_path):
    """Each slice was cut with `np.take`, which copied the whole (Fortran-ordered) volume for every slice: time
    quadratic in the slices (4x the slices took 23x the time; a 512 x 512 x 300 CT about 8 minutes). Counted in
    memory, not time (which other work on the machine blurs): a whole-volume copy shows at the peak."""
    import tracemalloc

    volume = (np.random.default_rng(0).random((128, 128, 64)) * 1000).astype(np.float32)
    path = write_nifti(tmp_path / "volume.nii", volume)
    tracemalloc.start()
    try:
        assert len(read_medical_slices(path, skip_empty_slices=False)) == 64
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    volume_bytes = volume.size * 8  # read as float64
    assert peak < 2.5 * volume_bytes  # the volume and its slices: 2.0x; with a copy of the volume per slice: 3.0x


def test_files_claiming_more_pixels_than_one_file_may_hold_are_refused_before_decoding(tmp_path, monkeypatch):
    """A small compressed DICOM of many large frames took 4 GB of memory (no limit on frames x rows x columns),
    and a multi-page TIFF of large deflated pages 1.5 GB (each page under PIL's limit, all decoded and copied)."""
    import PIL.Image

    from mic_diffrep.data import medical
    from mic_diffrep.models.mic_diffrep import preprocessing

    monkeypatch.setattr(medical, "MAX_VOXELS", 1000)  # the same checks as at 2^29, on small files
    monkeypatch.setattr(preprocessing, "MAX_VOXELS", 1000)
    frames = write_dicom(tmp_path / "frames.dcm", np.ones((3, 20, 20)))  # 1,200 pixels
    with pytest.raises(MedicalImageError, match=r"frames\.dcm: its header gives 3 frame\(s\) of 20 x 20 \(1,200 "
                                                r"pixels\), more than the 1,000 read from one file"):
        read_medical_slices(frames)
    assert len(read_medical_slices(write_dicom(tmp_path / "two.dcm", np.ones((2, 20, 20))))) == 2  # 800: read
    pages = [PIL.Image.fromarray(np.full((20, 20), k * 40, dtype=np.uint8)) for k in range(3)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(ValueError, match=r"pages\.tif: its 3 pages hold 1,200 pixels, more than the 1,000"):
        preprocessing.image_pages(str(tmp_path / "pages.tif"))
