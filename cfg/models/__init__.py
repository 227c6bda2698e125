"""Model scale YAMLs, shipped as detector.cfg.models."""
