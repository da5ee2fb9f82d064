"""Single-source domain-generalisation augmentations (the paper's Table 2 comparison methods), one file per method.

Plain torch functions and modules working on nnU-Net's z-scored training batches on the training device,
B×C×H×W (2d) or B×C×D×H×W (3d). The trainers in ``nnunetv2_desam/trainers`` apply them after nnU-Net's own
augmentation, in ``train_step``.
"""
