"""DeSAM's network components: SAM backbone, PRIM, PDMM, prompts and the DeSAM module."""

from nnunetv2_desam.networks.desam import DeSAM, DeSAMSettings
from nnunetv2_desam.networks.sam_checkpoint import SAMConfig, load_sam_state_dict

__all__ = ["DeSAM", "DeSAMSettings", "SAMConfig", "load_sam_state_dict"]
