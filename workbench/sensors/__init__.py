"""Sensor data for analysis: schemas (``schemas``), the typed Parquet tables built from stored
batches (``tables``), loading them (``loading``) and data yield (``yield_``)."""
