"""What comes out: metrics (`metrics`, as offline `evaluate` modules), plots (`plotting`), model cards
(`model_card`), Hub uploads (`hub`) and result files (`results`)."""

from .hub import HubError, create_hub_repo, push_folder, push_pipeline_to_hub, push_to_hub
from .metrics import Accuracy, ConfusionMatrix, MacroF1, PerClassRecall, classification_report
from .model_card import model_card_text, pipeline_card_text, write_model_card, write_pipeline_card
from .plotting import plot_accuracy_vs_timestep, plot_confusion_matrix
from .results import results_markdown, run_report_markdown


__all__ = ["Accuracy", "ConfusionMatrix", "HubError", "MacroF1", "PerClassRecall", "classification_report",
           "create_hub_repo", "model_card_text", "pipeline_card_text", "plot_accuracy_vs_timestep",
           "plot_confusion_matrix", "push_folder", "push_pipeline_to_hub", "push_to_hub", "results_markdown",
           "run_report_markdown", "write_model_card", "write_pipeline_card"]
