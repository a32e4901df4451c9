"""Training loop shared by both stages, stage 1 (CPT), stage 2 (contrastive), distributed helpers; installed as moca_fast.trainers."""
