"""What the SAM fine-tuning baselines (MedSAM, SAMed) share: their image input and one decoder call per image.

**Input.** Both feed their encoders RGB images scaled to [0, 1] without SAM's pixel mean/std,
resized to the square encoder input: MedSAM's ``train_one_gpu.py`` passes [0, 1] 1024² images
straight to ``image_encoder``, SAMed's ``train.py`` builds SAM with ``pixel_mean=[0, 0, 0],
pixel_std=[1, 1, 1]`` on [0, 1] slices resized to its input. :class:`UnitRangeInput` maps
intensities and channels as DeSAM does (:class:`~nnunetv2_desam.networks.sam_input.SAMInput`:
the plans' fixed window per channel, so tiles agree and nnU-Net's intensity augmentation reaches
the encoder), divides by 255 and resizes to S×S as they do (the aspect ratio is not kept).
"""

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder

from nnunetv2_desam.networks.sam_input import SAMInput


class UnitRangeInput(SAMInput):
    """nnU-Net patch B×C×H×W → B×3×S×S image in [0, 1] (S = ``image_size``), the baselines' encoder input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        return F.interpolate(self.rgb(x) / 255.0, size, mode="bilinear", align_corners=False, antialias=True)


def decode_each_image(
    mask_decoder: MaskDecoder, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
) -> torch.Tensor:
    """segment_anything's ``MaskDecoder.predict_masks`` for every image with the same P prompts.

    ``predict_masks`` decodes one image with several prompts (it repeats the image embedding per
    prompt), so a batch goes through it one image at a time.
    Shapes: embeddings B×D×G×G, image_pe 1×D×G×G, sparse P×T×D, dense P×D×G×G → masks B×P×M×4G×4G
    for the decoder's M mask tokens.
    """
    return torch.stack([mask_decoder.predict_masks(embedding[None], image_pe, sparse, dense)[0] for embedding in image_embeddings])
