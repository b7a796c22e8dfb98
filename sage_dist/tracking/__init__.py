"""Experiment tracking: :class:`MlflowTracker` (MLflow, rank 0 only) and the do-nothing :class:`NullTracker`.

Only this package imports ``mlflow`` , and only when a run is created, so importing it is cheap.
"""

from sage_dist.tracking.mlflow_tracker import (
    BackgroundTracker,
    MlflowTracker,
    NullTracker,
    TrackingTarget,
    check_tracking_reachable,
    ensure_experiment,
    git_sha,
    limit_http_retries,
    resolve_tracking,
    ui_instructions,
)

__all__ = ["BackgroundTracker", "MlflowTracker", "NullTracker", "TrackingTarget", "check_tracking_reachable",
           "ensure_experiment", "git_sha", "limit_http_retries", "resolve_tracking", "ui_instructions"]
