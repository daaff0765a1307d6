"""Data: on-disk parsers (sources), synthetic data, transforms, samplers and LightningDataModules."""
