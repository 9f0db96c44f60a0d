"""Input: the on-disk format, the demo dataset, preparation and the grain pipeline."""
