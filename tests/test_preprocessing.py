import re

import numpy as np
import PIL.Image
import pytest
import torch

from mic_diffrep.data import decode_images
from mic_diffrep.models.mic_diffrep.preprocessing import (WINDOW_PERCENTILES, ImagePreprocessing, image_to_pixels,
                                                          preprocess_images, pixels_to_model_input, resize_image, to_grayscale, window_intensities)


def test_inputs_of_every_kind_give_the_same_pixels():
    rng = np.random.default_rng(0)
    grey = (rng.random((20, 20)) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    expected = preprocess_images(PIL.Image.fromarray(grey), resolution=16)
    for image in (grey, rgb, PIL.Image.fromarray(rgb), torch.from_numpy(rgb).permute(2, 0, 1),
                  grey.astype(np.float32) / 255.0, torch.from_numpy(grey)):
        torch.testing.assert_close(preprocess_images(image, resolution=16), expected, atol=1 / 127.5, rtol=0)
    assert expected.shape == (1, 1, 16, 16)
    assert expected.min() >= -1 and expected.max() <= 1


def test_float_images_outside_0_1_are_windowed_not_clipped():
    # Raw MRI intensities or CT Hounsfield units as floats: clipped to [0, 1] they became a white or black image.
    rng = np.random.default_rng(1)
    unit = rng.random((20, 20)).astype(np.float32)
    expected = preprocess_images(unit, resolution=16)
    for image in (unit * 4000, unit * 255, unit * 2000 - 1000, torch.from_numpy(unit * 3000)):
        torch.testing.assert_close(preprocess_images(image, resolution=16), expected, atol=1 / 127.5, rtol=0)
    assert preprocess_images(unit * 4000, resolution=16).std() > 0.3


def test_range_and_scaling():
    white = PIL.Image.new("L", (8, 8), 255)
    black = PIL.Image.new("L", (8, 8), 0)
    assert preprocess_images([white, black], resolution=8)[:, 0, 0, 0].tolist() == [1.0, -1.0]


@pytest.mark.parametrize("mode", ["RGBA", "P", "CMYK", "LA", "I;16", "I", "F"])
def test_modes_become_single_grey_channel(mode):
    base = PIL.Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8))
    if mode in ("I;16", "I"):
        image = PIL.Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16 if mode == "I;16" else np.int32))
    elif mode == "F":
        image = PIL.Image.fromarray(np.arange(64, dtype=np.float32).reshape(8, 8))
    else:
        image = base.convert(mode)
    grey = to_grayscale(image)
    assert grey.shape == (8, 8)
    assert grey.dtype == (np.float64 if mode in ("I;16", "I", "F") else np.uint8)  # deep images keep their depth
    # Every mode keeps the ramp's order: darkest top-left, brightest bottom-right.
    assert grey[0, 0] < grey[-1, -1]
    pixels = image_to_pixels(image, 8)[0].numpy()
    assert pixels[0, 0] == 0 and pixels[-1, -1] == 255  # the percentile window spans 0..255
    assert (np.diff(pixels.flatten().astype(int)) >= 0).all()


def test_pad_keeps_whole_image_and_crop_fills():
    wide = PIL.Image.new("L", (40, 20), 255)
    padded = np.asarray(resize_image(wide, 20, "pad"))
    cropped = np.asarray(resize_image(wide, 20, "center_crop"))
    assert padded.shape == cropped.shape == (20, 20)
    assert padded[0].max() == 0 and padded[10].min() == 255  # black bars above and below the image
    assert cropped.min() == 255


def test_decode_path_equals_preprocess_images(tmp_path):
    """Training decodes files once into uint8; features preprocess PIL images: both must agree exactly."""
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        path = tmp_path / f"{i}.jpg"
        PIL.Image.fromarray((rng.random((30, 50, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    decoded = decode_images(paths, 24)
    direct = preprocess_images([PIL.Image.open(p) for p in paths], resolution=24)
    torch.testing.assert_close(pixels_to_model_input(decoded.pixels), direct, atol=0, rtol=0)


def test_bad_resolution_is_refused():
    with pytest.raises(ValueError, match="resolution"):
        image_to_pixels(PIL.Image.new("L", (4, 4)), 0)
    with pytest.raises(ValueError, match="resize_mode"):
        image_to_pixels(PIL.Image.new("L", (4, 4)), 8, "stretch")


def test_percentile_window_is_the_same_for_an_8_bit_slice_and_its_16_bit_copy(tmp_path):
    rng = np.random.default_rng(3)
    slice8 = (rng.random((40, 40)) * 180).astype(np.uint8)  # a dark slice: max well below 255
    slice8[5:15, 5:15] = 0
    PIL.Image.fromarray(slice8).save(tmp_path / "8bit.png")
    PIL.Image.fromarray(slice8.astype(np.uint16) * 257).save(tmp_path / "16bit.png")
    eight, sixteen = (image_to_pixels(str(tmp_path / name), 32) for name in ("8bit.png", "16bit.png"))
    torch.testing.assert_close(eight, sixteen, atol=1, rtol=0)
    low, high = np.percentile(slice8, WINDOW_PERCENTILES)
    expected = np.clip((slice8.astype(float) - low) * 255 / (high - low), 0, 255).round().astype(np.uint8)
    np.testing.assert_array_equal(window_intensities(slice8), expected)
    # "none" keeps 8-bit values, and min-max scales deeper ones.
    np.testing.assert_array_equal(window_intensities(slice8, "none"), slice8)
    assert window_intensities(slice8.astype(np.uint16) * 257, "none").max() == 255
    with pytest.raises(ValueError, match="intensity_window"):
        window_intensities(slice8, "minmax")


def test_explicit_window_wins_and_constant_images_are_kept():
    ramp = np.arange(0, 1000, 10, dtype=np.float64).reshape(10, 10)
    windowed = window_intensities(ramp, window=(200.0, 400.0))
    assert windowed[ramp <= 200].max() == 0 and windowed[ramp >= 400].min() == 255
    grey = np.full((4, 4), 77, dtype=np.uint8)
    np.testing.assert_array_equal(window_intensities(grey), grey)


def test_image_preprocessing_settings():
    settings = ImagePreprocessing(16, "center_crop", "none")
    image = np.zeros((20, 30), dtype=np.uint8)
    torch.testing.assert_close(settings(image), image_to_pixels(image, 16, "center_crop", "none"))
    assert ImagePreprocessing.of(16) == ImagePreprocessing(16, "pad", "percentile")
    with pytest.raises(ValueError, match="resize_mode"):
        ImagePreprocessing(16, "stretch")
    with pytest.raises(ValueError, match="resolution"):
        ImagePreprocessing(0)


def test_colour_arrays_are_read_as_pil_reads_colour_at_every_depth():
    """Red as 8-bit RGB was 76 (PIL's luma) but 85 as float or 16-bit RGB (a channel mean); transparent pixels of a
    PIL image went black but kept their colour as an array or tensor."""
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    assert to_grayscale(red)[0, 0] == 76
    assert to_grayscale(red.astype(np.float32) / 255)[0, 0] == pytest.approx(76, abs=0.5)
    assert to_grayscale(red.astype(np.uint16) * 257)[0, 0] == pytest.approx(76 * 257, rel=0.01)
    transparent = np.full((4, 4, 4), 200, np.uint8)
    transparent[..., 3] = 255
    transparent[:2, ..., 3] = 0
    expected = to_grayscale(PIL.Image.fromarray(transparent))
    assert expected[0, 0] == 0 and expected[3, 3] == 200
    for image in (transparent, torch.from_numpy(transparent).permute(2, 0, 1), transparent.astype(np.float32) / 255):
        grey = to_grayscale(image)
        assert grey[0, 0] == 0 and grey[3, 3] == pytest.approx(200, abs=0.5)


def test_a_few_slices_of_a_ct_volume_are_not_read_as_one_colour_image():
    """`processor(nib.load(f).dataobj)` of a (16, 16, 4) HU volume gave one RGBA image, alpha from the 4th slice."""
    volume = np.full((16, 16, 4), -1000, np.int16)
    volume[4:12, 4:12] = 40
    for array in (volume, volume.astype(np.float32)):
        with pytest.raises(ValueError, match=r"shape \(16, 16, 4\) with negative values is not a colour .*"
                                             r"volume\[\.\.\., k\]"):
            to_grayscale(array)
    assert to_grayscale(volume[..., 0]).min() == -1000  # one slice is an image


def test_a_tensor_of_another_shape_is_named_as_given():
    # A (64, 3, 64) tensor was reported as "got (64, 64, 3)... (H, W, C)": the shape after an internal permute.
    for shape in ((5, 20, 20), (20, 3, 20)):
        with pytest.raises(ValueError, match=re.escape(f"got {shape}; a batch of grey slices is (N, 1, H, W)")):
            to_grayscale(torch.zeros(shape))


def test_a_grey_numpy_batch_is_refused_with_the_shapes_that_are_read():
    """A (N, H, W) array, as `np.stack` of grey slices gives, said only which shapes are images; what to pass instead
    (and, for 3 or 4 rows, how a channels-first colour image is read) was left to guess."""
    for shape, channels_first in (((8, 20, 20), False), ((3, 20, 20), True)):
        message = re.escape(f"got {shape}; a batch of grey images is (N, H, W, 1)")
        with pytest.raises(ValueError, match=message) as error:
            to_grayscale(np.zeros(shape, np.uint8))
        assert ("array.transpose(1, 2, 0)" in str(error.value)) == channels_first
    batch = np.zeros((8, 20, 20), np.uint8)
    assert preprocess_images(batch[..., None], 16).shape == (8, 1, 16, 16)  # the hint's shape is read as a batch
    assert preprocess_images(list(batch), 16).shape == (8, 1, 16, 16)


def test_encoded_bytes_are_an_image_and_other_inputs_say_what_is_wrong():
    """bytes gave "got int" (iterated byte by byte), a dict "No such file: 'image'" (iterated by key), a dataset
    without an `image` column "got dict"."""
    import io

    import datasets

    from mic_diffrep.models.mic_diffrep.preprocessing import as_image_list

    buffer = io.BytesIO()
    PIL.Image.fromarray(np.arange(400, dtype=np.uint8).reshape(20, 20)).save(buffer, "PNG")
    png = buffer.getvalue()
    expected = image_to_pixels(PIL.Image.open(io.BytesIO(png)), 16)
    assert torch.equal(preprocess_images(png, 16), preprocess_images([png, png], 16)[:1])
    assert torch.equal(preprocess_images(png, 16)[0], pixels_to_model_input(expected[None])[0])
    with pytest.raises(TypeError, match="got a dict with keys \\['label', 'picture'\\]"):
        as_image_list({"picture": png, "label": 0})
    with pytest.raises(ValueError, match="needs an `image` column, got \\['picture'\\].*rename_column"):
        as_image_list(datasets.Dataset.from_dict({"picture": [png]}))


def test_the_image_processor_checks_its_resolution_as_the_settings_do():
    from mic_diffrep import MicDiffRepImageProcessor

    with pytest.raises(ValueError, match="`resolution` 100000 is above 2048 px"):  # it was taken
        MicDiffRepImageProcessor(resolution=100000)
