"""DeSAM's network components: SAM backbone, PRIM, PDMM, prompts and the DeSAM module."""

from nnunetv2_desam.networks.desam import DeSAM, DeSAMSettings
from nnunetv2_desam.networks.sam_checkpoint import SAMCheckpointError, SAMConfig, load_sam_state_dict, write_random_sam_checkpoint

__all__ = ["DeSAM", "DeSAMSettings", "SAMCheckpointError", "SAMConfig", "load_sam_state_dict", "write_random_sam_checkpoint"]
