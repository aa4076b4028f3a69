"""Data sources: manifests (CSV / JSON Lines / Parquet), splits, the embedded demo dataset, image and text
preprocessing, and the reader of the validated table."""
