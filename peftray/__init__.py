"""peftray: parameter-efficient fine-tuning jobs on Ray.

The public Python API is re-exported here; everything else may change between releases.
Importing peftray does not start or contact Ray, MLflow or S3.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
