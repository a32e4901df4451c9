"""Data for both stages: processor, PackedBatch, masking, packing, datasets, the synthetic world."""
