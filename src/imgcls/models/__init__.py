"""Models: a factory over timm with the study's knobs; never imports data or engine."""

from imgcls.models.factory import (
    build_model,
    check_model_name,
    count_norms,
    data_stats,
    freeze_stages,
    load_state_file,
    load_weights,
    remove_norms,
)

__all__ = ["build_model", "check_model_name", "count_norms", "data_stats", "freeze_stages", "load_state_file", "load_weights", "remove_norms"]
