
import numpy as np
import PIL.Image
import pytest
import torch

from mic_diffrep.data import decode_images
from mic_diffrep.preprocessing import image_to_pixels, preprocess_images, resize_image, to_grayscale


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
    assert grey.mode == "L" and grey.size == (8, 8)
    array = np.asarray(grey)
    # Every mode keeps the ramp's order: darkest top-left, brightest bottom-right.
    assert array[0, 0] < array[-1, -1]
    if mode in ("I;16", "I", "F"):
        assert array.min() == 0 and array.max() == 255  # min-max scaled


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
    decoded = decode_images(paths, resolution=24, show_progress=False)
    direct = preprocess_images([PIL.Image.open(p) for p in paths], resolution=24)
    torch.testing.assert_close(decoded.pixels.float() / 127.5 - 1, direct, atol=0, rtol=0)


def test_bad_resolution_is_refused():
    with pytest.raises(ValueError, match="resolution"):
        image_to_pixels(PIL.Image.new("L", (4, 4)), 0)
    with pytest.raises(ValueError, match="resize_mode"):
        image_to_pixels(PIL.Image.new("L", (4, 4)), 8, "stretch")
