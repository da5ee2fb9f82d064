"""What the SAM-based trainers check before nnU-Net's trainer starts: a failed ``nnUNetv2_train`` stops in one line,
before nnU-Net prints its preamble or opens a training log."""

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_desam.environment_variables import sam_checkpoint_path
from nnunetv2_desam.errors import ConfigurationError
from nnunetv2_desam.networks.sam_checkpoint import SAMConfig, load_sam_state_dict


def require_2d(patch_size, method: str, configuration: str = "") -> None:
    if len(patch_size) != 2:
        got = f" (got configuration '{configuration}')" if configuration else ""
        raise ConfigurationError(f"{method} is a 2D method, use -c 2d{got}")


def check_before_nnunet_starts(plans: dict, configuration: str, method: str) -> None:
    """The configuration is 2D and the SAM file (``DESAM_SAM_CHECKPOINT``, else the packaged LiteMedSAM) is one the
    networks can build on. The file is memory-mapped: checking it reads its index, not its weights."""
    require_2d(PlansManager(plans).get_configuration(configuration).patch_size, method, configuration)
    SAMConfig.from_state_dict(load_sam_state_dict(sam_checkpoint_path()))
