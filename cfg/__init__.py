"""Training settings (default.yaml) and model scales (models/), shipped inside the package as detector.cfg."""
