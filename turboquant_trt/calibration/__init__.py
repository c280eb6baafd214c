"""Calibration internals: statistics capture, transform tables, sensitivity, torch fake quantization."""
