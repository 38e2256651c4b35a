"""Packaged YAML configs: ``default.yaml`` and ``models/NAME.yaml`` (shipped inside the wheel)."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
