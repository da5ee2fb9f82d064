"""nnunetv2-desam: DeSAM (Decoupled Segment Anything Model, MICCAI 2024) as nnU-Net v2 trainers."""

__version__ = "0.1.0"
