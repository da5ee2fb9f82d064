"""DeSAM under nnU-Net's multi-GPU setting (DDP without unused parameters) and under torch.compile."""

import copy
import os
import socket
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from nnunetv2.run.run_training import get_trainer_from_args
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as nnunet_trainer_module
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunetv2_desam.networks.desam import DeSAM, DeSAMSettings
from nnunetv2_desam.networks.prompts import sample_training_points
from nnunetv2_desam.trainers.nnUNetTrainerDeSAM import nnUNetTrainerDeSAM
from tests.nnunet_workspace import SOURCE


def desam_trainer(network: DeSAM, device: str) -> nnUNetTrainerDeSAM:
    """nnUNetTrainerDeSAM with only what its train_step reads (made without __init__, which wants plans files and
    dataset folders): the network, Adam over PRIM and PDMM, nnU-Net's Dice + CE with DeSAM's deep-supervision weights,
    a GradScaler on CUDA as nnU-Net makes it, and a seeded prompt generator."""
    trainer = object.__new__(nnUNetTrainerDeSAM)
    dice_ce = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1, weight_dice=1,
                             ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    vars(trainer).update(
        network=network, device=torch.device(device), label_manager=LabelManager({"background": 0, "a": 1, "b": 2}, None),
        optimizer=torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=1e-4),
        loss=DeepSupervisionWrapper(dice_ce, nnUNetTrainerDeSAM.deep_supervision_weights),
        grad_scaler=torch.amp.GradScaler("cuda") if device == "cuda" else None, prompt_generator=torch.Generator().manual_seed(0),
    )
    return trainer


def random_batch(seed: int) -> dict:
    """nnU-Net's batch layout for DeSAM: 2 patches of 64², targets at full and half resolution."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 3, (2, 1, 64, 64), generator=generator)
    return {"data": torch.randn(2, 1, 64, 64, generator=generator), "target": [target, target[:, :, ::2, ::2]]}


TRAINERS = ["nnUNetTrainerDeSAM", "nnUNetTrainerDeSAM_Box", "nnUNetTrainerDeSAM_PDMMOnly", "nnUNetTrainerDeSAM_NoIoUHead",
            "nnUNetTrainerDeSAM_NoMEF"]
STEPS = 3  # an unused parameter makes DDP fail on the iteration after it


def cpu_ddp(module, device_ids):
    """nnU-Net wraps the network with device_ids=[rank] (a GPU per rank); DDP over CPU replicas takes none."""
    return DistributedDataParallel(module)


def rank_trainer(trainer_name: str):
    """The trainer as nnU-Net's run_ddp builds it in each rank (nnunetv2.run.run_training.get_trainer_from_args),
    moved to the CPU: nnU-Net sets cuda:<rank> under DDP, and the GradScaler it made for it goes."""
    trainer = get_trainer_from_args(str(SOURCE), "2d", 0, trainer_name, device=torch.device("cpu"))
    trainer.device, trainer.grad_scaler = torch.device("cpu"), None
    return trainer


def _ddp_worker(rank, world_size, port, environment, results):
    os.environ.update(environment)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        for trainer_name in TRAINERS:
            results[(trainer_name, rank)] = _train_steps(trainer_name)
        fresh = [rank_trainer("nnUNetTrainerDeSAM") for _ in range(2)]
        target = (torch.arange(8 * 32 * 32) % 3).view(8, 1, 32, 32)
        results[("prompts", rank)] = [sample_training_points(target, 2, t.prompt_generator).points for t in fresh]
    finally:
        dist.destroy_process_group()


def _train_steps(trainer_name: str) -> dict:
    """nnU-Net's initialize() and STEPS of the trainer's own train_step on batches of its own data loader."""
    torch.manual_seed(0)
    trainer = rank_trainer(trainer_name)
    with mock.patch.object(nnunet_trainer_module, "DDP", cpu_ddp):
        trainer.initialize()
    loader, _ = trainer.get_dataloaders()
    network = trainer.network.module
    initial = {k: v.clone() for k, v in network.state_dict().items()}
    losses = [float(trainer.train_step(next(loader))["loss"]) for _ in range(STEPS)]
    weights = {k: v.clone() for k, v in network.state_dict().items()}
    return {"weights": weights, "losses": losses, "batch_size": trainer.batch_size,
            "ddp": isinstance(trainer.network, DistributedDataParallel),
            "changed": sorted(k for k in weights if not torch.equal(weights[k], initial[k]))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_trainer_trains_with_its_own_train_step_under_two_process_gloo_ddp(workspace, tmp_path):
    """Each rank builds the trainer as nnU-Net's run_ddp does, initialises it (network, optimizer, DDP wrapper,
    loss) and runs its own train_step on batches of its own nnU-Net data loader: the replicas stay in sync
    although each rank sees other samples (nnU-Net splits the batch of 8 into 4 + 4) and draws other prompts."""
    root, environment = workspace
    environment = {**environment, "nnUNet_results": str(tmp_path)}  # the trainers' logs go here
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, free_port(), environment, results), nprocs=2, join=True)
        results = dict(results)
    for trainer_name in TRAINERS:
        first, second = results[(trainer_name, 0)], results[(trainer_name, 1)]
        assert first["ddp"] and (first["batch_size"], second["batch_size"]) == (4, 4)
        assert first["losses"] != second["losses"], trainer_name  # other samples on each rank
        trainable = {k for k in first["weights"] if k.startswith(("decoder.", "prim."))}
        assert first["changed"] and set(first["changed"]) <= trainable, trainer_name  # it trained
        assert first["weights"].keys() == second["weights"].keys()
        difference = max((first["weights"][k].float() - second["weights"][k].float()).abs().max().item() for k in first["weights"])
        assert difference <= 1e-6, trainer_name  # replicas in sync

    # nnUNetTrainerDeSAM's training prompts: the same in every trainer of one rank, other ones on the other rank
    (rank0_first, rank0_again), (rank1_first, rank1_again) = results[("prompts", 0)], results[("prompts", 1)]
    assert torch.equal(rank0_first, rank0_again) and torch.equal(rank1_first, rank1_again)
    assert not torch.equal(rank0_first, rank1_first)


CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; run by scripts/gpu_check/gpu_check.sh")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_ONLY)])
def test_torch_compile_trains_and_infers_like_nnunet(tiny_sam_checkpoint, device):
    """torch.compile on grid-point DeSAM, the path with PRIM, the IoU head and prompt combination, trained through
    nnUNetTrainerDeSAM's own train_step. nnU-Net compiles so on a GPU by default (nnUNet_compile unset), with
    inductor, under fp16 autocast; it never compiles on a CPU, where this test traces the same graph (dynamo and
    AOTAutograd, backend 'aot_eager') without inductor's C++ code generation (3-4 minutes on 2 cores). The encoder
    runs in fp32 on the CPU, so that eager and compiled runs compare to 1e-4."""
    torch.manual_seed(0)
    network = DeSAM.from_sam_checkpoint(tiny_sam_checkpoint, 1, 3, settings=DeSAMSettings(grid_size=3), cpu_bf16=False).to(device)
    twin = copy.deepcopy(network)
    compiled = torch.compile(twin, backend="inductor" if device == "cuda" else "aot_eager")
    eager_trainer, compiled_trainer = desam_trainer(network, device), desam_trainer(compiled, device)
    for network_in_use in (network, twin):
        network_in_use.train().decoder.deep_supervision = True
    eager_loss = float(eager_trainer.train_step(random_batch(0))["loss"])
    compiled_loss = float(compiled_trainer.train_step(random_batch(0))["loss"])
    assert compiled_loss == pytest.approx(eager_loss, abs=2e-2 if device == "cuda" else 1e-4)
    gradients = {name: p.grad for name, p in network.named_parameters() if p.requires_grad}  # train_step leaves them
    twin_gradients = {name: p.grad for name, p in twin.named_parameters() if p.requires_grad}
    assert all(g is not None for g in gradients.values()) and twin_gradients.keys() == gradients.keys()
    scale = max(g.abs().max().item() for g in gradients.values())
    worst = max((twin_gradients[name] - g).abs().max().item() for name, g in gradients.items())
    assert worst <= (2e-2 if device == "cuda" else 1e-4) * scale
    for network_in_use in (network, twin):
        network_in_use.decoder.deep_supervision = False
    x = torch.randn(1, 1, 64, 48, device=device)
    with torch.no_grad():
        expected, actual = network.eval()(x), compiled.eval()(x)
    assert torch.equal(actual.argmax(1), expected.argmax(1))
    if device == "cpu":  # fp32 throughout; on CUDA kernel choices may differ in the last bits
        assert torch.allclose(actual, expected, atol=1e-4)
