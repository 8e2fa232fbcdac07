"""Features of frozen models: which to take (`arguments`), the extractors behind one interface (`extractors`),
the feature cache (`cache`) and sharded extraction of a folder (`extraction`). The hooked UNet forward itself is
`mic_diffrep.models.mic_diffrep.unet_features`, shared with the exported classifier."""

from .arguments import DEFAULT_TIMESTEPS, ExtractionArguments, FeatureArguments
from .cache import (CachedFeatures, StaleFeatureCacheError, load_features, model_fingerprint, pixels_fingerprint,
                    save_features)
from .extraction import (extract_folder, extract_sharded, inherit_pretrained_slices, launch_precision,
                         noise_seeds_for, prepare_extractor, remove_parts)
from .extractors import (ClipFeatureExtractor, DiffusionFeatureExtractor, EncoderFeatureExtractor, FeatureExtractor,
                         load_feature_extractor, load_pipeline)


__all__ = ["CachedFeatures", "ClipFeatureExtractor", "DEFAULT_TIMESTEPS", "DiffusionFeatureExtractor",
           "EncoderFeatureExtractor", "ExtractionArguments", "FeatureArguments", "FeatureExtractor",
           "StaleFeatureCacheError", "extract_folder", "extract_sharded", "inherit_pretrained_slices", "launch_precision",
           "load_feature_extractor", "load_pipeline",
           "load_features", "model_fingerprint", "noise_seeds_for", "pixels_fingerprint", "prepare_extractor",
           "remove_parts", "save_features"]
