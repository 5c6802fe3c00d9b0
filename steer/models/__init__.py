"""Models: loading (registry, local, GGUF, hub), architecture adapters, site capture."""

from steer.models.adapters import ADAPTERS, ArchitectureAdapter, Site, adapter_for, hidden_size, parse_site_name
from steer.models.capture import capture
from steer.models.loading import DEFAULT_MODEL, REGISTRY, load_model

__all__ = [
    "ADAPTERS", "ArchitectureAdapter", "DEFAULT_MODEL", "REGISTRY", "Site",
    "adapter_for", "capture", "hidden_size", "load_model", "parse_site_name",
]
