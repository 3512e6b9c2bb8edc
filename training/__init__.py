"""Data sources, training stages, calibration, export and in-process evaluation."""
