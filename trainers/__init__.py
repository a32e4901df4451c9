"""The training loop shared by both stages, stage 1 (CPT), stage 2 (contrastive), checkpoints and resume, guards;
installed as moca_fast.trainers."""
