"""Pixel-SAIL model: configuration, modeling, processing. Imports torch and transformers only."""
