"""Pretraining: the settings (`arguments`), the shared loop (`loop`), checkpoints (`checkpointing`), DDPM
pretraining (`diffusion.pretrain`) and the baselines' pretraining (`baselines.pretrain_baseline`)."""

from .arguments import (RECIPE_KEYS, BaselinePretrainingArguments, CommonPretrainingArguments, PretrainingArguments,
                        default_recipe)
from .baselines import pretrain_baseline
from .diffusion import SUMMARY_FILE, denoising_loss, pretrain, sample_timesteps


__all__ = ["RECIPE_KEYS", "BaselinePretrainingArguments", "CommonPretrainingArguments", "PretrainingArguments",
           "SUMMARY_FILE", "default_recipe", "denoising_loss", "pretrain", "pretrain_baseline", "sample_timesteps"]
