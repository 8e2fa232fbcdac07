"""The settings of `mic-diffrep probe` / `training/linear_probe.py` (every field is a `--field` flag)."""

import warnings
from dataclasses import dataclass, field
from typing import List, Optional

from ..data.medical import PRETRAINED_SLICE_HELP, SliceSelection, slice_selection
from ..features.arguments import FeatureArguments
from ..leakage.search import check_threshold


@dataclass(kw_only=True)
class ProbeArguments(FeatureArguments):
    """Linear probing (SL sweep and MSFA) of a frozen model -> results, plots and a transformers model folder."""

    # Data
    pretrained: str = field(metadata={
        "help": "Pretrained pipeline folder (from pretraining), or a baseline's folder (from "
                "training/pretrain_baseline.py, or a local CLIPVisionModel) to score it with the same probe."})
    revision: Optional[str] = field(default=None, metadata={
        "help": "The revision (branch, tag or commit) of --pretrained when it is a Hub repository id (default: main). "
                "The results record the commit read."})
    data_dir: str = field(metadata={
        "help": "Labelled images: class sub-folders, optionally inside split folders (Training/Testing, "
                "train/val/test)."})
    resolution: Optional[int] = field(default=None, metadata={
        "help": "Image size fed to a CLIP baseline (default 112). Diffusion pipelines and other baselines read images "
                "at the size they were pretrained at; another size is refused."})
    test_data_dir: Optional[str] = field(default=None, metadata={
        "help": "Labelled test images (default: the test split of --data_dir, else a carved hold-out)."})
    output_dir: str = field(default="runs/probe", metadata={
        "help": "Model folder to write (config, weights, processor, card, results, plots)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace an earlier probe's results and model in --output_dir (refused without it; they are replaced "
                "only once the new results are ready, and its feature caches are reused)."})
    validation_split: float = field(default=0.2, metadata={
        "help": "Share of the training images held out for choosing layers and timesteps, when the data has no "
                "validation split of its own (a val/ folder beside train/, which is used as it is)."})
    test_split: float = field(default=0.2, metadata={
        "help": "Share of images held out for testing when there is no test split."})
    duplicate_threshold: Optional[float] = field(default=None, metadata={
        "help": "Fingerprint similarity above which images are near-duplicates (default: "
                "mic_diffrep.leakage.DEFAULT_THRESHOLD); carved splits keep such groups on one side."})
    exclude_leaked_test: bool = field(default=False, metadata={
        "help": "Score only test images without a near-duplicate in the training images (results always report "
                "both)."})
    skip_bad_images: bool = field(default=False, metadata={"help": "Skip unreadable images instead of failing."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Decoded-image cache (default OUTPUT_DIR/.cache)."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Processes decoding images."})
    slice_axis: Optional[int] = field(default=None, metadata={"help": PRETRAINED_SLICE_HELP["slice_axis"]})
    slice_range: Optional[List[int]] = field(default=None, metadata={"help": PRETRAINED_SLICE_HELP["slice_range"]})
    # Unset (None): the pretrained model's setting; bare `--keep_empty_slices` is true, `--keep_empty_slices false` off.
    keep_empty_slices: Optional[bool] = field(default=None, metadata={
        "help": PRETRAINED_SLICE_HELP["keep_empty_slices"], "nargs": "?", "const": True})
    # Probe training (paper: Adam 0.01, cosine annealing, batch 128, 15 epochs)
    num_epochs: int = field(default=15, metadata={"help": "Probe epochs (paper: 15)."})
    learning_rate: float = field(default=0.01, metadata={"help": "Initial learning rate (paper: 0.01)."})
    train_batch_size: int = field(default=128, metadata={"help": "Probe batch size (paper: 128)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay."})
    hidden_size: int = field(default=512, metadata={
        "help": "MSFA aggregation width (eq. 5); 0: a single linear layer on the concatenated features (not the "
                "paper's MSFA)."})
    classifier_dropout: float = field(default=0.0, metadata={
        "help": "Dropout on the aggregated features (the classifier config's `classifier_dropout`)."})
    dropout: Optional[float] = field(default=None, metadata={"help": "Deprecated: --classifier_dropout."})
    no_standardize: bool = field(default=False, metadata={"help": "Do not standardise features."})
    random_flip: bool = field(default=False, metadata={
        "help": "Train the heads on each training image or, at random, its mirror image (left-right; the mirror "
                "images' features are extracted too, so twice the training side's extraction). Validation, test "
                "and the exported classifier see images as they are."})
    seed: int = field(default=0, metadata={"help": "Seed of the probe's training (its heads' initial weights and "
                                                    "batch order)."})
    split_seed: int = field(default=0, metadata={
        "help": "Seed of the validation and test parts carved from the data (--validation_split, --test_split). Apart "
                "from --seed, so that runs of several seeds are scored on the same images."})
    # Hub
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the model folder to the Hub."})
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "Hub repository id (default: folder name)."})
    hub_token: Optional[str] = field(default=None, metadata={"help": "Hub token (default: the stored login)."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the repository as private."})

    def __post_init__(self):
        super().__post_init__()
        if self.dropout is not None:  # its earlier name, in scripts and `ProbeArguments(dropout=...)`
            if self.classifier_dropout not in (0.0, self.dropout):
                raise ValueError(f"`dropout` {self.dropout} and `classifier_dropout` {self.classifier_dropout}: give "
                                 f"--classifier_dropout only.")
            warnings.warn("`dropout` of the probe is deprecated and will be removed: it is `classifier_dropout` "
                          "(--classifier_dropout), as the classifier's config calls it.", FutureWarning, stacklevel=3)
            self.classifier_dropout, self.dropout = self.dropout, None
        for name in ("validation_split", "test_split"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be in (0, 1) (a fraction of the images), got {getattr(self, name)}.")
        check_threshold(self.duplicate_threshold, allow_none=True, name="duplicate_threshold")  # before any decoding
        self.slices  # checks the slice flags

    @property
    def slices(self) -> SliceSelection:
        """Which slices of DICOM / NIfTI files are images (`--slice_axis`, `--slice_range`, `--keep_empty_slices`;
        those the pretrained model read, `inherit_pretrained_slices`, once its folder is loaded)."""
        return slice_selection(2 if self.slice_axis is None else self.slice_axis, self.slice_range,
                               bool(self.keep_empty_slices))
