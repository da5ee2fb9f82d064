"""DeSAM under nnU-Net's multi-GPU setting (DDP without unused parameters) and under torch.compile."""

import socket
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunetv2_desam.networks.desam import DeSAM, DeSAMSettings
from nnunetv2_desam.networks.prompts import sample_training_points

SETTINGS = {
    "points": DeSAMSettings(),
    "box": DeSAMSettings(prompt_mode="box", use_iou_head=False),
    "pdmm-only": DeSAMSettings(use_prim=False, use_iou_head=False, fuse_mask_embedding=False),
    "no-iou-head": DeSAMSettings(use_iou_head=False),
    "no-mef": DeSAMSettings(fuse_mask_embedding=False),
}


def segmentation_loss():
    dice_ce = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1, weight_dice=1,
                             ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    return DeepSupervisionWrapper(dice_ce, (2 / 3, 1 / 3))


def training_step(network, loss_function, settings, generator, device="cpu") -> torch.Tensor:
    """What nnUNetTrainerDeSAM does per iteration, on a random batch: DS outputs, Dice+CE, 10·MSE(IoU)."""
    target = torch.randint(0, 3, (2, 1, 64, 64), generator=generator)
    x = torch.randn(2, 1, 64, 64, generator=generator).to(device)
    if settings.prompt_mode == "points" and settings.use_prim:
        points, iou_target = sample_training_points(target, 2, generator)
        outputs, iou = network(x, points=points.to(device))
    else:
        outputs, iou = network(x), None
    target = target.to(device)
    loss = loss_function(outputs, [target, target[:, :, ::2, ::2]])
    if iou is not None:
        loss = loss + 10 * torch.nn.functional.mse_loss(iou[:, 0].float(), iou_target.to(device))
    return loss


def _ddp_worker(rank, world_size, port, sam_path, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        for mode, settings in SETTINGS.items():
            results[(mode, rank)] = _ddp_train(sam_path, settings, rank)
    finally:
        dist.destroy_process_group()


def _ddp_train(sam_path, settings, rank) -> dict:
    """Three DDP training steps; returns the trained weights of this rank."""
    torch.manual_seed(0)
    network = DeSAM.from_sam_checkpoint(sam_path, 1, 3, settings=settings)
    network.decoder.deep_supervision = True
    model = DistributedDataParallel(network.train())
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank sees other data
    loss_function = segmentation_loss()
    for _ in range(3):  # an unused parameter makes DDP fail on the iteration after it
        optimizer.zero_grad(set_to_none=True)
        training_step(model, loss_function, settings, generator).backward()
        optimizer.step()
    return {k: v.clone() for k, v in network.state_dict().items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_training_steps_of_every_mode_run_under_two_process_gloo_ddp(tiny_sam_checkpoint):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, free_port(), str(tiny_sam_checkpoint), results), nprocs=2, join=True)
        results = dict(results)
    for mode in SETTINGS:
        first, second = results[(mode, 0)], results[(mode, 1)]
        assert first.keys() == second.keys()
        assert all(torch.allclose(first[k].float(), second[k].float(), atol=1e-6) for k in first), mode  # replicas in sync


CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; run by scripts/gpu_check/gpu_check.sh")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_ONLY)])
def test_inductor_compiles_training_and_inference_like_nnunet(tiny_sam_checkpoint, device):
    """torch.compile's default backend (inductor) on grid-point DeSAM, the path with PRIM, the IoU head
    and prompt combination. nnU-Net compiles so on a GPU by default (nnUNet_compile unset) and trains
    under fp16 autocast there; it never compiles on a CPU, where inductor still checks the same graph
    (about 3 minutes on 2 cores with a cold cache, most of it C++ code generation)."""
    settings = DeSAMSettings(grid_size=3)
    torch.manual_seed(0)
    network = DeSAM.from_sam_checkpoint(tiny_sam_checkpoint, 1, 3, settings=settings).to(device)
    compiled = torch.compile(network)
    network.decoder.deep_supervision = True
    loss_function = segmentation_loss()
    precision = torch.autocast("cuda", dtype=torch.float16) if device == "cuda" else nullcontext()
    with precision:
        eager_loss = training_step(network.train(), loss_function, settings, torch.Generator().manual_seed(0), device)
        compiled_loss = training_step(compiled.train(), loss_function, settings, torch.Generator().manual_seed(0), device)
    assert torch.allclose(eager_loss, compiled_loss, atol=2e-2 if device == "cuda" else 1e-4)
    compiled_loss.backward()
    assert all(p.grad is not None for p in network.parameters() if p.requires_grad)
    network.decoder.deep_supervision = False
    x = torch.randn(1, 1, 64, 48, device=device)
    with torch.no_grad():
        expected, actual = network.eval()(x), compiled.eval()(x)
    assert torch.equal(actual.argmax(1), expected.argmax(1))
    if device == "cpu":  # fp32 throughout; on CUDA kernel choices may differ in the last bits
        assert torch.allclose(actual, expected, atol=1e-4)
