"""The embedded local stack: SeaweedFS S3, an MLflow server and a Ray head, as child processes."""

from peftray.stack.core import StackStatus, config, down, status, up
from peftray.stack.servers import Options

__all__ = ["Options", "StackStatus", "config", "down", "status", "up"]
