"""Adapter training on Ray Train, from a job spec to a registered adapter.

    run_job(spec_or_path, config=None) -> TrainResult     the Python entry (driver side)
    python -m peftray.train --spec PATH_OR_S3_URI          the entrypoint the control plane launches
    scaling_config(resources) -> ray.train.ScalingConfig  CPU / GPU / TPU workers from `resources`

The loop itself (`peftray.train.loop.train`) is plain PyTorch; `peftray.train.worker` runs it under Ray Train.
Importing this package does not import Ray.
"""

from __future__ import annotations

from peftray.train.run import TrainingError, TrainResult, run_job
from peftray.train.scaling import check_cluster, scaling_config

__all__ = ["TrainResult", "TrainingError", "check_cluster", "run_job", "scaling_config"]
