"""Images in: folders (`folders`), `datasets` data written as one (`saving`), decoding once into uint8 tensors
(`decoding`), the pretraining dataset (`pretraining_dataset`), augmentations (`augmentations`) and clinical formats
(`medical`). The preprocessing itself lives with the model (`mic_diffrep.models.mic_diffrep.preprocessing`) and is
re-exported here."""

from ..models.mic_diffrep.preprocessing import (INTENSITY_WINDOWS, RESIZE_MODES, ImagePreprocessing, image_to_pixels,
                                                pixels_to_model_input, preprocess_images, to_grayscale,
                                                window_intensities)
from ..models.mic_diffrep.unet_features import seed_for
from .decoding import BadImageError, DecodedImages, decode_images, images_fingerprint
from .folders import (IMAGE_EXTENSIONS, SEARCHED_EXTENSIONS, SEARCHED_WHAT, SPLIT_ALIASES, TEST_IMAGES_FILE,
                      check_labelled, find_image_files, find_split_folders, is_image_file, label_by_class_folder,
                      listed_files, load_image_folder, read_image_list, relative_image_id, select_splits,
                      write_image_list)
from .medical import (MEDICAL_EXTENSIONS, MedicalImageError, MedicalSlice, SliceSelection, is_medical_file,
                      read_medical_slices)
from .pretraining_dataset import PretrainingDataset
from .saving import save_image_folder


__all__ = ["BadImageError", "DecodedImages", "IMAGE_EXTENSIONS", "INTENSITY_WINDOWS", "ImagePreprocessing",
           "MEDICAL_EXTENSIONS", "MedicalImageError", "MedicalSlice", "PretrainingDataset", "RESIZE_MODES",
           "SEARCHED_EXTENSIONS", "SEARCHED_WHAT", "SPLIT_ALIASES", "SliceSelection", "check_labelled",
           "decode_images", "find_image_files", "find_split_folders",
           "image_to_pixels", "images_fingerprint", "is_image_file", "is_medical_file", "label_by_class_folder",
           "listed_files", "load_image_folder",
           "pixels_to_model_input", "preprocess_images", "read_image_list", "read_medical_slices", "relative_image_id",
           "save_image_folder", "seed_for", "select_splits", "TEST_IMAGES_FILE", "to_grayscale",
           "window_intensities", "write_image_list"]
