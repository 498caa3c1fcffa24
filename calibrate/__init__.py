"""Offline work that produces artifacts (DESIGN.md decision 7), run by `slimfx calibrate`:
DuoAttention retrieval heads (duo_heads.py), bit-allocation plans (bits.py), the VQ
head codebook (vq_head.py, kmeans.py). Each artifact's format and reader live with the
pass or runtime op that reads it; calibration writes through them.
"""
