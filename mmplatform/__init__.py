"""mmplatform: image-text data to an audited, registered multimodal model (see docs/ and DESIGN.md)."""

from mmplatform.environment import configure as _configure_environment

_configure_environment()  # before any of our modules can import Ray, MLflow or transformers
