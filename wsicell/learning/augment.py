"""Crops on the training device: uint8 to ``[-1, 1]`` floats, and the augmentations
(random rotations and mirror images, stain perturbation in optical-density space).
"""

from __future__ import annotations

import torch


def to_unit_range(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1] (on the batch's device)."""
    return batch.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


# Optical-density colours of hematoxylin, eosin and a residual channel (rows; Ruifrok &
# Johnston 2001, as in scikit-image's ``rgb_from_hed``).
HED_FROM_OD = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_OD = HED_FROM_OD / HED_FROM_OD.norm(dim=1, keepdim=True)


def stain_jitter(rgb: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Random stain perturbation in hematoxylin/eosin optical-density space.

    Each crop's hematoxylin and eosin concentrations are scaled by ``U(1-sigma, 1+sigma)``
    and shifted by ``U(-sigma, sigma)`` (Tellez et al. 2018); the residual channel is kept.

    Parameters
    ----------
    rgb : Tensor, shape (B, 3, H, W), float in [0, 255]
    sigma : float
        Perturbation strength (0 leaves the crops unchanged).
    generator : torch.Generator on the device of ``rgb``

    Returns
    -------
    Tensor, shape (B, 3, H, W), float in [0, 255]
    """
    stains = HED_FROM_OD.to(rgb.device)
    od = -torch.log((rgb + 1.0) / 256.0)
    concentration = torch.einsum("bchw,cs->bshw", od, torch.linalg.inv(stains))
    b = rgb.shape[0]
    draw = torch.rand(2, b, 3, 1, 1, generator=generator, device=rgb.device) * 2 - 1
    keep = torch.tensor([1.0, 1.0, 0.0], device=rgb.device).view(1, 3, 1, 1)
    concentration = concentration * (1 + sigma * draw[0] * keep) + sigma * draw[1] * keep
    od = torch.einsum("bshw,sc->bchw", concentration, stains)
    return (256.0 * torch.exp(-od) - 1.0).clamp_(0, 255)


def random_rotation(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image of (B, C, H, W) by a random multiple of 90 degrees (0/90/180/270)."""
    turns = torch.randint(0, 4, (x.shape[0],), generator=generator, device=x.device)
    out = x
    for k in (1, 2, 3):
        out = torch.where((turns == k).view(-1, 1, 1, 1), torch.rot90(x, k, dims=(2, 3)), out)
    return out


def random_dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of (B, C, H, W) rotated by a random multiple of 90 degrees and mirrored
    with probability 1/2: a random one of the square's 8 symmetries."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    return random_rotation(x, generator)


def prepare_batch(batch: torch.Tensor, generator: torch.Generator | None = None,
                  rotate: bool = False, stain_sigma: float = 0.0) -> torch.Tensor:
    """uint8 crops (B, 32, 32, 3) on the device -> augmented float (B, 3, 32, 32) in [-1, 1].

    Augmentations (they need ``generator``): the stain perturbation of :func:`stain_jitter`
    when ``stain_sigma > 0``, then a random rotation by 0/90/180/270 degrees when ``rotate``.
    """
    if stain_sigma > 0:
        x = stain_jitter(batch.permute(0, 3, 1, 2).float(), stain_sigma, generator)
        x = x.div_(127.5).sub_(1.0)
    else:
        x = to_unit_range(batch)
    return random_rotation(x, generator) if rotate else x
