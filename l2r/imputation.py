"""ROAD's noisy linear imputation (Rong et al., ICML 2022), batched on the images' device.

Every removed pixel, per channel, equals the weighted mean of its 8 neighbours (1/6 for the
4 edge neighbours, 1/12 for the 4 diagonal ones; neighbours outside the image drop out and
the weights are renormalised). All removed pixels of an image are solved jointly, then
Gaussian noise is added to them. The removed set's shape then carries no colour edge a
model could read, unlike a solid reference (the paper's argument; measured in benchmarks/RESULTS.md,
"CIFAR-10 quality of the shipped explainers": the random control no longer deletes fastest).

The system is the same as the reference implementation's (pytorch-grad-cam's
`NoisyLinearImputer`, a sparse direct solve per image on the CPU); here it is solved by
conjugate gradients in float64, the matrix applied as a stencil: on the removed pixels it is
S - W (S the in-image weight sum, W the neighbour weights), symmetric and positive definite
whenever an image keeps at least one pixel. A geometric multigrid V-cycle (float32) preconditions
it. The solve is sized to ROAD's noise: it stops when the V-cycle's estimate of the error is
below TOLERANCE on every pixel, which keeps the imputed values within ERROR_TARGET (a tenth of
the noise's sigma) of an exact solve on masks from real maps at 32, 160 and 224 px
(benchmarks/imputation.py).

`impute_chains` takes the nested masks of a curve's steps: on a CPU it solves them one after the
other, each started from the previous step's solution and cropped to its removed pixels.

An image with every pixel removed has no data to impute from: it becomes MEAN_COLOUR (the
"mean" reference's colour) plus the noise: the solver's start, which it never leaves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EDGE_WEIGHT = 1.0 / 6.0
DIAGONAL_WEIGHT = 1.0 / 12.0
NOISE_SIGMA = 0.01  # the paper's and pytorch-grad-cam's default
MEAN_COLOUR = (0.485, 0.456, 0.406)  # the ImageNet mean; also the "mean" reference
# The accuracy promised: imputed values within a tenth of ROAD's noise of the exact solve.
ERROR_TARGET = NOISE_SIGMA / 10
# CG stops when the preconditioned residual (the V-cycle's estimate of the error) is below this
# on every pixel; chosen by measurement against a float64 direct solve on masks from real maps
# at 32, 160 and 224 px (benchmarks/imputation.py; benchmarks/RESULTS.md, "Imputation").
TOLERANCE = ERROR_TARGET / 4
# float32 rounding alone leaves errors of 1e-3 on large holes at 160 px (the system's condition
# grows with the hole's width squared); float64 keeps them at the tolerance.
SOLVE_DTYPE = torch.float64
PRECONDITIONER_DTYPE = torch.float32  # an approximate inverse: float32 halves its memory traffic
# With the multigrid preconditioner CG needs a handful of iterations; this is only a guard.
MAX_ITERATIONS = 500
# On a CPU the solve goes in batches of at most this many pixel values: the working arrays then
# stay in cache, and each batch stops when its own systems have converged, not the slowest of
# thousands. A GPU gets the whole batch: there a call's fixed cost dominates.
CPU_BATCH_VALUES = 1 << 18


def neighbour_kernel(device=None, dtype=torch.float32) -> torch.Tensor:
    """The 3x3 neighbour weights as a conv kernel (1, 1, 3, 3); the centre is 0."""
    d, e = DIAGONAL_WEIGHT, EDGE_WEIGHT
    return torch.tensor([[d, e, d], [e, 0.0, e], [d, e, d]], device=device, dtype=dtype).view(1, 1, 3, 3)


def noise_field(shape, sigma: float, seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The noise added to imputed pixels: one (C, H, W) field per (seed, shape).

    Shared by every image and every step, so an image's imputation (and its AUCs) does not
    depend on the batch it was computed in, and a rerun reproduces it exactly.
    """
    generator = torch.Generator().manual_seed(int(seed))
    return (sigma * torch.randn(*shape, generator=generator)).to(device=device, dtype=dtype)


def impute(images: torch.Tensor, masks: torch.Tensor, noise: float = NOISE_SIGMA, seed: int = 0,
           noise_values: torch.Tensor | None = None, tolerance: float = TOLERANCE,
           max_iterations: int = MAX_ITERATIONS) -> torch.Tensor:
    """Images (N, C, H, W) with the pixels where `masks` (N, 1, H, W) or (N, H, W) is true imputed.

    Pixels outside the mask are returned unchanged. `noise` is the noise's sigma (0: none);
    `noise_values` (C, H, W) overrides the seeded field (training draws fresh noise per step).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    removed = masks.reshape(masks.shape[0], 1, *masks.shape[-2:]).to(device=images.device, dtype=torch.bool)
    if removed.shape != (n, 1, h, w):
        raise ValueError(f"masks {tuple(masks.shape)} do not fit images {tuple(images.shape)}")
    solved = solve(images, removed, tolerance, max_iterations)
    if noise_values is None and noise > 0:
        noise_values = noise_field((c, h, w), noise, seed, images.device, images.dtype)
    if noise_values is not None:
        solved = solved + noise_values.to(solved)
    return torch.where(removed, solved, images)


def impute_chains(images: torch.Tensor, masks: torch.Tensor, noise: float = NOISE_SIGMA, seed: int = 0,
                  tolerance: float = TOLERANCE, max_iterations: int = MAX_ITERATIONS) -> torch.Tensor:
    """`impute` for chains of nested masks, as the steps of a deletion curve remove them.

    images (N, C, H, W); masks (N, S, H, W), image n's mask s + 1 removing every pixel of its
    mask s. Returns (N, S, C, H, W), each mask imputed as `impute` would (the same system, the
    same seeded noise field), to within the solver's tolerance.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    removed = masks.to(device=images.device, dtype=torch.bool)
    if removed.dim() != 4 or removed.shape[0] != n or removed.shape[-2:] != (h, w):
        raise ValueError(f"masks {tuple(masks.shape)} are not (N, S, H, W) chains for images {tuple(images.shape)}")
    if bool((removed[:, :-1] & ~removed[:, 1:]).any()):
        raise ValueError("the masks of a chain must be nested: each removes every pixel of the one before")
    solved = solve_chains(images, removed, tolerance, max_iterations)
    if noise > 0:
        solved = solved + noise_field((c, h, w), noise, seed, images.device, images.dtype)
    return torch.where(removed[:, :, None], solved, images[:, None])


OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))  # a 3x3 stencil, row-major
CENTRE = 4
SMOOTHING_WEIGHT = 0.7  # damped Jacobi; with one sweep before and after, the V-cycle is symmetric
COARSEST_PIXELS = 150  # a level this small is solved directly (a dense Cholesky factor)


def _shifted(values: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """values[..., y + dy, x + dx], zero outside the image."""
    h, w = values.shape[-2:]
    padded = F.pad(values, (1, 1, 1, 1))
    return padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def _span(offset: int, size: int) -> tuple[slice, slice]:
    """Along one axis, the positions that have a neighbour at `offset`, and those neighbours."""
    return slice(max(0, -offset), size - max(0, offset)), slice(max(0, offset), size + min(0, offset))


def _stencil_matvec(stencil: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A 3x3 stencil with coefficients per pixel (N, 9, H, W) applied to (N, C, H, W).

    Each neighbour is added in place on the slices that have it: no padded copies (the
    solver's time is in passes over memory).
    """
    h, w = values.shape[-2:]
    out = stencil[:, CENTRE:CENTRE + 1] * values
    for index, (dy, dx) in enumerate(OFFSETS):
        if index != CENTRE:
            (ty, sy), (tx, sx) = _span(dy, h), _span(dx, w)
            out[..., ty, tx].addcmul_(stencil[:, index:index + 1, ty, tx], values[..., sy, sx])
    return out


def _fine_stencil(removed: torch.Tensor, weight_sum: torch.Tensor) -> torch.Tensor:
    """The system's matrix as a stencil (N, 9, H, W): S on the diagonal, -w between removed pixels."""
    kernel = neighbour_kernel(removed.device, removed.dtype)[0, 0]
    rows = []
    for index, (dy, dx) in enumerate(OFFSETS):
        if index == CENTRE:
            rows.append(weight_sum.expand_as(removed) * removed)
        else:
            rows.append(-kernel[1 + dy, 1 + dx] * removed * _shifted(removed, dy, dx))
    return torch.cat(rows, dim=1)


def _odd(size: int) -> int:
    return size + 1 - size % 2


def _prolong(values: torch.Tensor, size) -> torch.Tensor:
    """P: coarse node i sits on fine pixel 2i; the pixels between two nodes take their mean."""
    *lead, hc, wc = values.shape
    rows = values.new_empty(*lead, 2 * hc - 1, wc)
    rows[..., 0::2, :] = values
    torch.add(values[..., :-1, :], values[..., 1:, :], out=rows[..., 1::2, :]).mul_(0.5)
    out = values.new_empty(*lead, 2 * hc - 1, 2 * wc - 1)
    out[..., 0::2] = rows
    torch.add(rows[..., :-1], rows[..., 1:], out=out[..., 1::2]).mul_(0.5)
    return out[..., :size[0], :size[1]]


def _restrict(values: torch.Tensor) -> torch.Tensor:
    """P^T: each node gathers its pixel and half of each pixel between it and the next node."""
    h, w = values.shape[-2:]
    values = F.pad(values, (0, _odd(w) - w, 0, _odd(h) - h))
    rows = values[..., 0::2, :].clone()
    between = values[..., 1::2, :]
    rows[..., 1:, :].add_(between, alpha=0.5)
    rows[..., :-1, :].add_(between, alpha=0.5)
    out = rows[..., 0::2].clone()
    between = rows[..., 1::2]
    out[..., 1:].add_(between, alpha=0.5)
    out[..., :-1].add_(between, alpha=0.5)
    return out


def _galerkin_stencil(matvec, removed: torch.Tensor) -> torch.Tensor:
    """The coarse matrix P^T A P for bilinear P (masked to the removed pixels), as a 3x3 stencil;
    `matvec` applies A to (N, K, H, W), `removed` (N, 1, H, W) is the level's mask.

    Found by probing: coarse nodes three apart never share a stencil, so applying P^T A P to the
    nine colour classes of nodes (i mod 3, j mod 3) gives every coefficient.
    """
    n, _, h, w = removed.shape
    hc, wc = (_odd(h) + 1) // 2, (_odd(w) + 1) // 2
    ys = torch.arange(hc, device=removed.device)
    xs = torch.arange(wc, device=removed.device)
    probes = torch.stack([((ys[:, None] % 3 == a) & (xs[None, :] % 3 == b)) for a in range(3) for b in range(3)])
    fine = _prolong(probes.to(removed.dtype)[None], (h, w)) * removed
    applied = _restrict(matvec(fine))  # (N, 9 classes, hc, wc)
    # Coefficient (i, j) -> (i + dy, j + dx) is the response at (i, j) to the neighbour's class.
    classes = torch.stack([((ys[:, None] + dy) % 3) * 3 + (xs[None, :] + dx) % 3 for dy, dx in OFFSETS])
    return applied.gather(1, classes[None].expand(n, -1, -1, -1))


def _dense_cholesky(stencil: torch.Tensor) -> torch.Tensor:
    """The Cholesky factors (N, P, P) of a small level's matrix, given as a 3x3 stencil.

    Pixels outside every hole (a zero row) get a unit diagonal; a system with nothing kept is
    singular (constants are its null space), so a tiny multiple of the identity keeps every
    factor finite: such a system's residual is zero anyway.
    """
    n, _, h, w = stencil.shape
    pixels = h * w
    dense = stencil.new_zeros(n, pixels, pixels)
    grid = torch.arange(pixels, device=stencil.device).view(h, w)
    for index, (dy, dx) in enumerate(OFFSETS):
        (ty, sy), (tx, sx) = _span(dy, h), _span(dx, w)
        rows, cols = grid[ty, tx].flatten(), grid[sy, sx].flatten()
        dense[:, rows, cols] = stencil[:, index, ty, tx].flatten(1)
    diagonal = dense.diagonal(dim1=1, dim2=2)
    scale = diagonal.amax(dim=1, keepdim=True).clamp_min(1e-12)
    diagonal += torch.where(diagonal > 0, 1e-6 * scale, torch.ones_like(diagonal))
    return torch.linalg.cholesky_ex(dense)[0]


class _Multigrid:
    """A symmetric V-cycle of geometric multigrid: damped Jacobi, bilinear interpolation,
    Galerkin coarse matrices (so the holes' shapes carry over to every level)."""

    def __init__(self, removed: torch.Tensor, weight_sum: torch.Tensor):
        # An approximate inverse needs no float64: the V-cycle runs in float32 (half the memory
        # traffic), CG's own vectors stay in the solve's dtype.
        removed, weight_sum = removed.to(PRECONDITIONER_DTYPE), weight_sum.to(PRECONDITIONER_DTYPE)

        minus_removed = -removed

        def fine_matvec(u):
            return _neighbour_sum(u).addcmul_(weight_sum, u, value=-1.0).mul_(minus_removed)

        # The finest level needs no stencil: its matrix is the separable fine_matvec, and its
        # diagonal is S on the removed pixels (probing it is the setup's largest pass).
        self.matvecs, self.steps, self.removed = [], [], []
        if removed.shape[-2] * removed.shape[-1] <= COARSEST_PIXELS:
            self.coarsest = _dense_cholesky(_fine_stencil(removed, weight_sum))
            return
        self.matvecs.append(fine_matvec)
        self.steps.append(SMOOTHING_WEIGHT * removed / weight_sum)
        self.removed.append(removed)
        stencil = _galerkin_stencil(fine_matvec, removed)
        level_removed = (stencil[:, CENTRE:CENTRE + 1] > 0).to(removed.dtype)
        while stencil.shape[-2] * stencil.shape[-1] > COARSEST_PIXELS:
            self.matvecs.append(lambda values, stencil=stencil: _stencil_matvec(stencil, values))
            self.steps.append(SMOOTHING_WEIGHT / stencil[:, CENTRE:CENTRE + 1].clamp_min(1e-12))
            self.removed.append(level_removed)
            stencil = _galerkin_stencil(self.matvecs[-1], level_removed)
            level_removed = (stencil[:, CENTRE:CENTRE + 1] > 0).to(removed.dtype)
        self.coarsest = _dense_cholesky(stencil)

    def __call__(self, residual: torch.Tensor) -> torch.Tensor:
        return self._cycle(residual.to(PRECONDITIONER_DTYPE), 0).to(residual.dtype)

    def _cycle(self, residual: torch.Tensor, level: int) -> torch.Tensor:
        if level == len(self.matvecs):
            n, c, h, w = residual.shape
            solved = torch.cholesky_solve(residual.reshape(n, c, h * w).transpose(1, 2), self.coarsest)
            return solved.transpose(1, 2).reshape(n, c, h, w)
        matvec, step = self.matvecs[level], self.steps[level]
        correction = residual * step
        coarse = self._cycle(_restrict(residual - matvec(correction)), level + 1)
        correction.addcmul_(_prolong(coarse, residual.shape[-2:]), self.removed[level])
        return correction.addcmul_(residual - matvec(correction), step)


def _neighbour_sum(values: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each pixel's in-image neighbours, every channel alike (zero padding).

    The weights are (outer([1, 2, 1], [1, 2, 1]) - 4 at the centre) / 12, so the sum is two
    1-D passes, each added in place on slices: 2.5x faster on a CPU than with padded copies,
    and far faster than a one-channel 3x3 convolution.
    """
    # The weight folded into the vertical pass and the centre into the horizontal one: seven
    # passes over memory, where the solve's time goes.
    vertical = values * (2.0 * DIAGONAL_WEIGHT)
    vertical[..., 1:, :].add_(values[..., :-1, :], alpha=DIAGONAL_WEIGHT)
    vertical[..., :-1, :].add_(values[..., 1:, :], alpha=DIAGONAL_WEIGHT)
    out = torch.add(vertical, values, alpha=-2.0 * DIAGONAL_WEIGHT).mul_(2.0)
    out[..., 1:] += vertical[..., :-1]
    out[..., :-1] += vertical[..., 1:]
    return out


def _per_system(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The dot product of each (image, channel) system: (N, C, H, W) twice -> (N, C, 1, 1)."""
    return torch.linalg.vecdot(first.flatten(-2), second.flatten(-2))[..., None, None]


def _bounding_box(removed: torch.Tensor) -> tuple[slice, slice]:
    """Rows and columns that hold every removed pixel of a batch, plus the one-pixel ring of
    kept neighbours the equations read: the whole system lives inside."""
    h, w = removed.shape[-2:]
    rows = removed.flatten(end_dim=-2).any(dim=-1).reshape(-1, h).any(dim=0).nonzero()
    cols = removed.any(dim=-2).reshape(-1, w).any(dim=0).nonzero()
    if len(rows) == 0:
        return slice(0, 0), slice(0, 0)
    return (slice(max(0, int(rows[0]) - 1), min(h, int(rows[-1]) + 2)),
            slice(max(0, int(cols[0]) - 1), min(w, int(cols[-1]) + 2)))


def _solve_cropped(images: torch.Tensor, removed: torch.Tensor, start: torch.Tensor | None, tolerance: float,
                   max_iterations: int) -> torch.Tensor:
    """The solve on the bounding box of the removed pixels; (N, C, H, W) in the solver's dtype."""
    out = (start if start is not None else images).to(SOLVE_DTYPE, copy=True)
    rows, cols = _bounding_box(removed)
    if rows.stop > rows.start:
        out[..., rows, cols] = _solve_batch(images[..., rows, cols], removed[..., rows, cols],
                                            None if start is None else start[..., rows, cols],
                                            tolerance, max_iterations)
    return out


def _cpu_batches(images: torch.Tensor) -> int:
    return max(1, CPU_BATCH_VALUES // images[0].numel()) if images.device.type == "cpu" else len(images)


@torch.no_grad()
def solve(images: torch.Tensor, removed: torch.Tensor, tolerance: float = TOLERANCE,
          max_iterations: int = MAX_ITERATIONS) -> torch.Tensor:
    """The noise-free imputation on the removed pixels (values elsewhere are meaningless)."""
    batch = _cpu_batches(images)
    return torch.cat([_solve_cropped(part, part_removed, None, tolerance, max_iterations)
                      for part, part_removed in zip(images.split(batch), removed.split(batch))]).to(images.dtype)


def _local_fill(previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """A start for the next step of a chain: the previous step's image, its newly removed pixels
    set to the weighted mean of their neighbours that are not new (their own value where all are)."""
    known = 1.0 - new.to(previous.dtype)
    weights = _neighbour_sum(known)
    mean = _neighbour_sum(previous * known) / weights.clamp_min(1e-12)
    return torch.where(new & (weights > 0), mean, previous)


def solves_in_sequence(device: torch.device) -> bool:
    """Whether a chain's steps are solved one after the other (a CPU) or all at once (a device):
    the one place that decides it."""
    return device.type == "cpu"


@torch.no_grad()
def solve_chains(images: torch.Tensor, removed: torch.Tensor, tolerance: float = TOLERANCE,
                 max_iterations: int = MAX_ITERATIONS) -> torch.Tensor:
    """`solve` for chains of nested masks: images (N, C, H, W), removed (N, S, H, W) where each
    image's mask s + 1 removes every pixel of its mask s. Returns (N, S, C, H, W).

    On a CPU (`solves_in_sequence`) the steps go one after the other, each started from the
    previous step's solution (new pixels from their neighbours) and cropped to its removed
    pixels, so small early holes cost little. A device solves all masks of all chains as one
    batch: there a call's fixed cost dominates.
    """
    n, s, h, w = removed.shape
    if not solves_in_sequence(images.device):
        flat = solve(images.repeat_interleave(s, dim=0), removed.reshape(n * s, 1, h, w), tolerance, max_iterations)
        return flat.view(n, s, *images.shape[1:])
    out = images.new_empty(n, s, *images.shape[1:])
    batch = _cpu_batches(images)
    for first in range(0, n, batch):
        part, part_removed = images[first:first + batch], removed[first:first + batch]
        previous = None
        for step in range(s):
            mask = part_removed[:, step:step + 1]
            start = None
            if previous is not None:
                start = _local_fill(previous, mask & ~part_removed[:, step - 1:step])
            solved = _solve_cropped(part, mask, start, tolerance, max_iterations)
            previous = torch.where(mask, solved, part.to(SOLVE_DTYPE))
            out[first:first + batch, step] = solved.to(images.dtype)
    return out


def _solve_batch(images: torch.Tensor, removed: torch.Tensor, start: torch.Tensor | None, tolerance: float,
                 max_iterations: int) -> torch.Tensor:
    n, c, h, w = images.shape
    dtype = SOLVE_DTYPE
    x = images.to(dtype)
    removed_f = removed.to(dtype)
    kept_f = 1.0 - removed_f
    # S: the weight of each pixel's in-image neighbours (1 inside, less on the border). On a crop
    # it is wrong only on the crop's own edge, which holds kept pixels only.
    weight_sum = _neighbour_sum(torch.ones(1, 1, h, w, device=x.device, dtype=dtype))

    minus_removed = -removed_f

    def matvec(u):  # (S - W) restricted to the removed pixels; u is zero elsewhere
        return _neighbour_sum(u).addcmul_(weight_sum, u, value=-1.0).mul_(minus_removed)

    rhs = removed_f * _neighbour_sum(x * kept_f)
    # Without a start, each image's mean kept colour: CG then only has to shape it. With nothing
    # kept the mean colour is the answer (the residual is zero from the start).
    kept_count = kept_f.sum(dim=(-2, -1), keepdim=True)
    fallback = torch.tensor(MEAN_COLOUR if c == len(MEAN_COLOUR) else [sum(MEAN_COLOUR) / 3] * c,
                            device=x.device, dtype=dtype).view(1, c, 1, 1)
    if start is None:
        kept_mean = _per_system(x, kept_f.expand_as(x)) / kept_count.clamp_min(1.0)
        u = removed_f * torch.where(kept_count > 0, kept_mean, fallback)
    else:
        u = removed_f * torch.where(kept_count > 0, start.to(dtype), fallback)
    # With nothing kept the system is singular (constants are its null space): no iterations,
    # or rounding in the residual would grow along that null space.
    residual = (rhs - matvec(u)) * (kept_count > 0)
    precondition = _Multigrid(removed_f, weight_sum)
    z = precondition(residual)
    # z = M^-1 r estimates the error A^-1 r pixel by pixel (the V-cycle M is close to A): CG stops
    # once it is within the tolerance on every pixel of the batch.
    direction = z
    rz = _per_system(residual, z)
    for _ in range(max_iterations):
        if bool(z.abs().amax() <= tolerance):
            break
        a_direction = matvec(direction)
        curvature = _per_system(direction, a_direction)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(torch.finfo(dtype).tiny),
                            torch.zeros_like(rz))
        u.addcmul_(alpha, direction)
        residual.addcmul_(alpha, a_direction, value=-1.0)
        z = precondition(residual)
        rz_next = _per_system(residual, z)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(rz))
        direction = z + beta * direction  # z is read again by the stopping test
        rz = rz_next
    return u
