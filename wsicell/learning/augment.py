"""Crops on the training device: uint8 to ``[-1, 1]`` floats, each nucleus optionally
scaled to a fixed size and its measured size optionally given as a fourth channel, and the
augmentations (random rotations and mirror images, stain
perturbation in optical-density space).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_unit_range(batch: torch.Tensor, nucleus_px: float = 0.0,
                  size_channel: float = 0.0) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, C, H, W) in [-1, 1] (on the batch's device).

    Each nucleus is scaled by :func:`fit_nuclei` when ``nucleus_px > 0``; when
    ``size_channel > 0`` a fourth channel (C = 4) holds, as a constant plane, the nucleus's
    :func:`size_plane` measured on the crop as stored (before scaling), times
    ``size_channel``.  Otherwise C = 3.
    """
    x = batch.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    size = size_plane(x) if size_channel > 0 else None
    if nucleus_px > 0:
        x = fit_nuclei(x, nucleus_px)
    if size is None:
        return x
    plane = (size_channel * size).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
    return torch.cat([x, plane], dim=1)


def nucleus_pixels(x: torch.Tensor) -> torch.Tensor:
    """The nucleus of each crop, (B, C, H, W) float in [-1, 1] -> (B, H, W) bool: the pixels
    not white in some RGB channel (crops are exactly 1 outside their nucleus)."""
    return (x[:, :3] < 1 - 1e-3).any(dim=1)


def size_plane(x: torch.Tensor) -> torch.Tensor:
    """Each crop's nucleus size on a [-1, 1] scale: ``sqrt(area) / (H / 2) - 1``, the area
    being the number of nucleus (not white) pixels; -1 for no nucleus, 1 for a full crop.

    Parameters
    ----------
    x : Tensor, shape (B, C, H, W), float in [-1, 1]
        Crops whose background is exactly 1 in every channel (H == W).

    Returns
    -------
    Tensor, shape (B,), float32

    Examples
    --------
    >>> x = torch.ones(2, 3, 32, 32)
    >>> x[0, :, 8:24, 8:24] = -1  # a 16 x 16 px nucleus
    >>> size_plane(x).tolist()
    [0.0, -1.0]
    """
    area = nucleus_pixels(x).sum(dim=(1, 2)).float()
    return area.sqrt() / (x.shape[2] / 2) - 1


def fit_nuclei(x: torch.Tensor, nucleus_px: float) -> torch.Tensor:
    """Scale each crop's nucleus so that the longer side of its box spans ``nucleus_px``
    pixels, centred in the crop (bilinear; the nucleus's size is taken out of the crop).

    The nucleus is what is not white: crops are white (1) outside it.  A crop without a
    nucleus pixel is returned unchanged.

    Parameters
    ----------
    x : Tensor, shape (B, C, H, W), float in [-1, 1]
        Crops whose background is exactly 1 in every channel.
    nucleus_px : float
        Side, in output pixels, of the longer side of each nucleus's box.

    Returns
    -------
    Tensor, shape (B, C, H, W), float in [-1, 1]

    Examples
    --------
    >>> x = torch.ones(1, 3, 32, 32)
    >>> x[:, :, 15:17, 14:18] = -1  # a 2 x 4 px nucleus
    >>> dark = fit_nuclei(x, 16)[0, 0] < 0
    >>> dark.any(dim=1).sum().item(), dark.any(dim=0).sum().item()  # rows, columns
    (8, 16)
    """
    h, w = x.shape[2:]
    inside = nucleus_pixels(x)
    rows, cols = inside.any(dim=2), inside.any(dim=1)
    found = rows.any(dim=1)
    r0, r1 = _extent(rows)
    c0, c1 = _extent(cols)
    extent = torch.maximum(r1 - r0, c1 - c0).clamp_min(1).float()
    zero = torch.zeros_like(extent)
    shrink = torch.where(found, extent / nucleus_px, torch.ones_like(extent))
    # output pixel-edge coordinate u in [-1, 1] samples input coordinate centre + u * shrink
    # (align_corners=False: edge coordinates e in pixels are 2 e / size - 1)
    centre_x = torch.where(found, (c0 + c1).float() / w - 1, zero)
    centre_y = torch.where(found, (r0 + r1).float() / h - 1, zero)
    theta = torch.stack([torch.stack([shrink, zero, centre_x], dim=1),
                         torch.stack([zero, shrink, centre_y], dim=1)], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # sample x - 1 with zero padding: what lies outside the crop is white
    return F.grid_sample(x - 1, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False) + 1


def _extent(occupied: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First index and one past the last index of the True entries of each row of a
    (B, N) bool tensor (N and 0 for a row without one)."""
    index = torch.arange(occupied.shape[1], device=occupied.device)
    first = torch.where(occupied, index, occupied.shape[1]).amin(dim=1)
    last = torch.where(occupied, index, -1).amax(dim=1) + 1
    return first, last


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
                  rotate: bool = False, stain_sigma: float = 0.0,
                  nucleus_px: float = 0.0, size_channel: float = 0.0) -> torch.Tensor:
    """uint8 crops (B, 32, 32, 3) on the device -> augmented float (B, C, 32, 32) in [-1, 1].

    The crops as :func:`to_unit_range` gives them (``nucleus_px``, ``size_channel``).
    Augmentations (they need ``generator``): the stain perturbation of
    :func:`stain_jitter` (of the RGB channels) when ``stain_sigma > 0``, then a random
    rotation by 0/90/180/270 degrees when ``rotate``.
    """
    x = to_unit_range(batch, nucleus_px, size_channel)
    if stain_sigma > 0:
        rgb = stain_jitter(x[:, :3].add(1.0).mul_(127.5), stain_sigma, generator)
        x = torch.cat([rgb.div_(127.5).sub_(1.0), x[:, 3:]], dim=1)
    return random_rotation(x, generator) if rotate else x
