r"""The LoRA update as one autograd function that keeps only what its backward needs.

For a frozen layer's output y0 = W x + b, the adapted output is

    y = y0 + s · B A (m ⊙ x) / (1 - p),     m_ij ~ Bernoulli(1 - p) (m = 1 when p = 0).

Autograd through the plain modules keeps, per adapted layer, the dropped-out copy of x (and the dropout
mask), so q, k and v reading the same x keep three copies and three masks. The backward needs only

    ∂L/∂B = s · g h^T,   ∂L/∂A = s · (B^T g) (m ⊙ x)^T / (1 - p),   ∂L/∂x += s · m ⊙ (A^T B^T g) / (1 - p),

with g = ∂L/∂y and h = A (m ⊙ x) / (1 - p) (rank r: small). So this function saves x itself (one tensor,
shared by every adapter that reads it), h, and m: on CPU the positions of the dropped elements (0.4 bytes an
element at p = 0.1), else one byte an element (a quarter of an fp32 x).

The mask comes from a counter-based hash in int32 tensor ops, cheaper than drawing Bernoulli variables from
the global generator on CPU; the keys are drawn from torch's default generator, so `torch.manual_seed` makes
runs repeatable. Two forms, each a pure function of (p, keys, shape):

- on CPU with p <= POSITIONS_MAX_P, the flat positions of the dropped elements: the gaps between them are
  independent Geometric(p) draws, G = floor(log u / log(1 - p)) + 1 with u uniform from the hash of the
  gap's index, so every element is dropped independently with probability p (to 2^-24, u's resolution),
  as Bernoulli draws per element would give. That hashes ~p·N·D counters instead of N·D, and keeps 4 bytes
  per dropped element (0.4 bytes an element at p = 0.1) for the backward. The forward and backward zero
  those positions of a copy of x (and of the low-rank term of ∂L/∂x in place); 1/(1 - p) goes on the rank-r
  products instead of on x.
- elsewhere (GPUs, where the hash's passes are cheap and a data-dependent length would need a sync;
  larger p), a dense mask: the hash of every element index, kept when its top 24 bits fall below
  (1 - p)·2^24 (the keep probability exact to 2^-24), saved as one byte an element.
Every matmul is laid out so that the large operand is read along its rows (the skinny (N×r)·(r×D) shapes
are 4-5x slower on CPU in the other layout).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The fused path's default (LoraLayer.fast_path); a recipe turns it off per model with training.fused_lora.
ENABLED = True
# up to this dropout rate a CPU mask is drawn as the positions of the dropped elements (module docstring)
POSITIONS_MAX_P = 0.25

# lowbias32's multipliers (C. Wellons, "Prospecting for hash functions"), as signed int32
_M1 = 0x7FEB352D
_M2 = 0x846CA68B - (1 << 32)
_INT32 = 1 << 32


def draw_keys() -> tuple[int, int]:
    """Two keys from torch's default CPU generator (no device sync on GPU): an odd multiplier, an offset."""
    k1, k2 = torch.randint(0, 1 << 31, (2,), dtype=torch.int64).tolist()
    return 2 * k1 + 1, k2


def keep_threshold(p: float) -> int:
    """Element kept when the hash's top 24 bits, as a signed value in [-2^23, 2^23), are below this."""
    return round((1.0 - p) * (1 << 24)) - (1 << 23)


def _int32(values: torch.Tensor) -> torch.Tensor:
    """int64 values mod 2^32, as int32."""
    values = torch.remainder(values, _INT32)
    return torch.where(values >= 1 << 31, values - _INT32, values).to(torch.int32)


def dropout_multiplier(rows: int, cols: int, p: float, keys: tuple[int, int], device=None) -> torch.Tensor:
    """A (rows, cols) float32 tensor of 0 and 1/(1-p), a pure function of (p, keys, shape): the mask the fused
    functions apply to a (rows, cols) input on `device`."""
    if by_positions(torch.device(device or "cpu"), rows * cols, p):
        mult = torch.full((rows * cols,), 1.0 / (1.0 - p), dtype=torch.float32, device=device)
        return mult.index_fill_(0, dropped_positions(rows * cols, p, keys), 0.0).view(rows, cols)
    return _multiplier(dropout_keep(rows, cols, p, keys, device), p)


def by_positions(device: torch.device, numel: int, p: float) -> bool:
    """Whether a mask for `numel` elements on `device` is drawn as dropped positions (module docstring)."""
    return device.type == "cpu" and 0.0 < p <= POSITIONS_MAX_P and numel < 1 << 31


def _signed32(value: int) -> int:
    value %= _INT32
    return value - _INT32 if value >= 1 << 31 else value


def _lowbias32_(h: torch.Tensor) -> torch.Tensor:
    """lowbias32's rounds on int32 h, in place: h ^= h >>> 16, h *= M1, h ^= h >>> 15, h *= M2."""
    t = torch.bitwise_right_shift(h, 16)
    h.bitwise_xor_(t.bitwise_and_(0xFFFF)).mul_(_M1)  # a logical shift: the arithmetic one copies the sign bit
    torch.bitwise_right_shift(h, 15, out=t)
    return h.bitwise_xor_(t.bitwise_and_(0x1FFFF)).mul_(_M2)


def _gaps(count: int, p: float, keys: tuple[int, int], offset: int) -> torch.Tensor:
    """Gaps offset .. offset + count - 1 between dropped positions: floor(log u / log(1 - p)) + 1 (int64),
    u = (the top 24 bits of lowbias32(i·k1 + k2) + 1/2) / 2^24 for gap index i."""
    k1, k2 = keys
    h = torch.arange(count, dtype=torch.int32).mul_(_signed32(k1)).add_(_signed32(offset * k1 + k2))
    top = torch.bitwise_right_shift(_lowbias32_(h), 8).bitwise_and_(0xFFFFFF)
    u = top.to(torch.float64).add_(0.5).mul_(1.0 / (1 << 24))
    return u.log_().mul_(1.0 / math.log1p(-p)).floor_().add_(1.0).to(torch.int64)


_SIGMAS, _EXTRA_GAPS = 12.0, 32


def dropped_positions(total: int, p: float, keys: tuple[int, int]) -> torch.Tensor:
    """The sorted flat positions (int64, CPU) of the elements dropped among `total`, a pure function of
    (total, p, keys): the running sums of Geometric(p) gaps, minus one."""
    mean = total * p
    # gaps enough for 12 standard deviations past the mean count: one draw, in practice always
    count = max(1, int(mean + _SIGMAS * math.sqrt(mean * (1.0 - p))) + _EXTRA_GAPS)
    positions = _gaps(count, p, keys, 0).cumsum_(0).sub_(1)
    drawn = count
    while positions[-1].item() < total:  # never seen; kept so that the mask is exact whatever the draw
        more = _gaps(count, p, keys, drawn).cumsum_(0).add_(positions[-1])
        positions, drawn = torch.cat((positions, more)), drawn + count
    return positions[: int(torch.searchsorted(positions, total))]


def reference_dropped(total: int, p: float, keys: tuple[int, int]) -> list[int]:
    """dropped_positions in plain Python integers and floats (for tests)."""
    k1, k2 = keys
    mask = _INT32 - 1
    out, position, i = [], -1, 0
    while True:
        h = (i * k1 + k2) & mask
        h ^= h >> 16
        h = h * _M1 & mask
        h ^= h >> 15
        h = h * (_M2 & mask) & mask
        u = ((h >> 8) + 0.5) / (1 << 24)
        position += math.floor(math.log(u) / math.log1p(-p)) + 1
        if position >= total:
            return out
        out.append(position)
        i += 1


def dropout_keep(rows: int, cols: int, p: float, keys: tuple[int, int], device=None) -> torch.Tensor:
    """A (rows, cols) int32 tensor: -1 (all bits set) where the element is kept, 0 where it is dropped.

    For element c = i·cols + j, all mod 2^32: h = c·k1 + k2, then lowbias32's rounds h ^= h >>> 16,
    h *= M1, h ^= h >>> 15, h *= M2; kept when the top 24 bits of h are below (1-p)·2^24. c·k1 + k2 is
    built as a broadcast sum of a row and a column vector.
    """
    k1, k2 = keys
    rows_part = _int32(torch.arange(rows, dtype=torch.int64, device=device) * (cols * k1) + k2)
    cols_part = _int32(torch.arange(cols, dtype=torch.int64, device=device) * k1)
    h = _lowbias32_(rows_part[:, None] + cols_part[None, :])
    t = torch.bitwise_right_shift(h, 8)
    # t < T  <=>  (t - T) < 0: an arithmetic shift by 31 turns that into all-ones; no overflow since
    # |t - T| < 2^24.
    return t.sub_(keep_threshold(p)).bitwise_right_shift_(31)


def _multiplier(keep: torch.Tensor, p: float) -> torch.Tensor:
    """dropout_keep's -1/0 (int32, overwritten) as the float32 multiplier 1/(1-p) or 0: all-ones bits
    select the bit pattern of the float 1/(1-p)."""
    scale_bits = torch.tensor([1.0 / (1.0 - p)], dtype=torch.float32).view(torch.int32).item()
    return keep.bitwise_and_(scale_bits).view(torch.float32)


def reference_multiplier(index: int, p: float, keys: tuple[int, int]) -> float:
    """The same hash for one flat element index in plain Python integers (for tests)."""
    k1, k2 = keys
    mask = _INT32 - 1
    h = (index * k1 + k2) & mask
    h ^= h >> 16
    h = h * _M1 & mask
    h ^= h >> 15
    h = h * (_M2 & mask) & mask
    top = h >> 8
    top = top - (1 << 24) if top >= 1 << 23 else top  # what an arithmetic shift of the signed value gives
    return 1.0 / (1.0 - p) if top < keep_threshold(p) else 0.0


def _mask(p: float, keys, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The multiplier for x2's shape, or None without dropout."""
    if p == 0.0 or keys is None:
        return None
    return dropout_multiplier(x2.shape[0], x2.shape[1], p, keys, x2.device).to(dtype)


def _mask_and_bytes(p: float, keys, x2: torch.Tensor, dtype: torch.dtype):
    """(the multiplier, the same mask as int8 1/0 for the backward), or (None, None) without dropout."""
    if p == 0.0 or keys is None:
        return None, None
    keep = dropout_keep(x2.shape[0], x2.shape[1], p, keys, x2.device)
    # (the dense form; _low_rank takes the positions form first where by_positions says so)
    kept = keep.to(torch.int8).neg_()  # one byte an element, a quarter of an fp32 x
    return _multiplier(keep, p).to(dtype), kept


def _mask_from_bytes(kept: torch.Tensor | None, p: float, dtype: torch.dtype) -> torch.Tensor | None:
    """The forward's multiplier again from its int8 copy: 1 · float32(1/(1-p)) is the same float."""
    if kept is None:
        return None
    return kept.to(torch.float32).mul_(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)).to(dtype)


def _dropped(x2: torch.Tensor, dtype: torch.dtype, mult: torch.Tensor | None) -> torch.Tensor:
    """x2 ⊙ m / (1 - p) in the adapter's dtype (x2 itself when nothing changes)."""
    xc = x2.to(dtype)
    return xc if mult is None else xc * mult


def _zeroed(x2: torch.Tensor, dtype: torch.dtype, positions: torch.Tensor) -> torch.Tensor:
    """A copy of x2 in `dtype` with the dropped positions zeroed (no 1/(1-p): the caller scales)."""
    return x2.to(dtype).reshape(-1).index_fill(0, positions, 0.0).view(x2.shape)


def _low_rank(ctx, x2, weight_a, p, keys) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h^T = A drop(x) (r×N), and the mask for the backward to rebuild drop(x): the dropped positions
    (1-D int32) or the dense mask as int8 (2-D)."""
    ctx.p = p
    if keys is not None and by_positions(x2.device, x2.numel(), p):
        positions = dropped_positions(x2.numel(), p, keys)
        h_t = weight_a @ _zeroed(x2, weight_a.dtype, positions).t()
        return h_t.mul_(1.0 / (1.0 - p)), positions.to(torch.int32)  # kept in 4 bytes a dropped element
    mult, kept = _mask_and_bytes(p, keys, x2, weight_a.dtype)
    return weight_a @ _dropped(x2, weight_a.dtype, mult).t(), kept


def _adapter_grads(ctx, g2, x, h_t, kept, weight_a, weight_b, ia: int):
    """s · B^T g (r×N; with dropped positions, s/(1-p) · B^T g), ∂L/∂A, ∂L/∂B and `mask_`, which applies
    the rest of the mask to the low-rank term of ∂L/∂x in place; A and B are the function's inputs ia, ia + 1."""
    s = ctx.scaling
    x2 = x.reshape(-1, x.shape[-1])
    positions = kept is not None and kept.dim() == 1
    gb_t = (weight_b.t() @ g2.t()).mul_(s / (1.0 - ctx.p) if positions else s)  # (r, N)
    grad_a = grad_b = None
    if positions:
        dropped = kept.to(torch.int64)
        if ctx.needs_input_grad[ia]:
            grad_a = gb_t @ _zeroed(x2, weight_a.dtype, dropped)
        mask_ = lambda t: t.view(-1).index_fill_(0, dropped, 0.0).view(t.shape)  # noqa: E731
    else:
        mult = _mask_from_bytes(kept, ctx.p, weight_a.dtype)
        if ctx.needs_input_grad[ia]:
            grad_a = gb_t @ _dropped(x2, weight_a.dtype, mult)
        mask_ = None if mult is None else (lambda t: t.mul_(mult))
    if ctx.needs_input_grad[ia + 1]:
        grad_b = (h_t @ g2).mul_(s).t()  # (out, r)
    return gb_t, grad_a, grad_b, mask_


class LoraLinear(torch.autograd.Function):
    """A frozen nn.Linear and its LoRA update as one function: y = x W^T + b + s · B A drop(x).

    Saves x (shared by every layer that reads it), h^T = A drop(x) (r×N) and the mask's keys; the
    backward writes ∂L/∂x once (g W, then the low-rank term added in place) instead of two tensors that
    autograd would then sum.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weight_a, weight_b, scaling, p, keys):
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
        h_t, kept = _low_rank(ctx, x2, weight_a, p, keys)
        y.addmm_(h_t.t(), weight_b.t(), alpha=scaling)
        ctx.save_for_backward(x, h_t, kept, weight, weight_a, weight_b)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, h_t, kept, weight, weight_a, weight_b = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        gb_t, grad_a, grad_b, mask_ = _adapter_grads(ctx, g2, x, h_t, kept, weight_a, weight_b, ia=3)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if mask_ is None:
                grad_x = (g2 @ weight).addmm_(gb_t.t(), weight_a)
            else:  # the masked low-rank term first, then g W accumulated onto it inside the matmul
                grad_x = mask_(gb_t.t() @ weight_a).addmm_(g2, weight)
            grad_x = grad_x.view(x.shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None


class LoraUpdate(torch.autograd.Function):
    """y = y0 + s · B A drop(x) for any base layer y0 (casts where dtypes differ, none saved)."""

    @staticmethod
    def forward(ctx, x, result, weight_a, weight_b, scaling, p, keys):
        h_t, kept = _low_rank(ctx, x.reshape(-1, x.shape[-1]), weight_a, p, keys)
        out = _add_update(result, h_t, weight_b, scaling)
        ctx.save_for_backward(x, h_t, kept, weight_a, weight_b)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, h_t, kept, weight_a, weight_b = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(weight_b.dtype)
        gb_t, grad_a, grad_b, mask_ = _adapter_grads(ctx, g2, x, h_t, kept, weight_a, weight_b, ia=2)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = gb_t.t() @ weight_a  # (N, in)
            if mask_ is not None:
                grad_x = mask_(grad_x)
            grad_x = grad_x.to(x.dtype).view(x.shape)
        return grad_x, grad_out, grad_a, grad_b, None, None, None


def _add_update(
    result: torch.Tensor, h_t: torch.Tensor, weight_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """result + s · h^T B^T, in one addmm where the dtypes agree."""
    r2 = result.reshape(-1, result.shape[-1])
    if r2.dtype == weight_b.dtype:
        out = torch.addmm(r2, h_t.t(), weight_b.t(), alpha=scaling)
    else:
        out = r2 + torch.mm(h_t.t(), weight_b.t()).mul_(scaling).to(r2.dtype)
    return out.view(result.shape)


def _plain_update(x, weight_a, weight_b, scaling, p, keys) -> torch.Tensor:
    """s · B A drop(x) with the plain modules' operations (no-grad with dropout, or dtypes that differ)."""
    x2 = x.reshape(-1, x.shape[-1])
    xd = _dropped(x2, weight_a.dtype, _mask(p, keys, x2, weight_a.dtype))
    update = F.linear(F.linear(xd, weight_a), weight_b) * scaling
    return update.view(*x.shape[:-1], update.shape[-1])


def lora_update(
    x: torch.Tensor,
    result: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    scaling: float,
    p: float = 0.0,
    keys: tuple[int, int] | None = None,
) -> torch.Tensor:
    """result + scaling · B A dropout_p(x); the mask is drawn (or taken from `keys`) when p > 0."""
    if p > 0.0 and keys is None:
        keys = draw_keys()
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or result.requires_grad or weight_a.requires_grad or weight_b.requires_grad
    )
    if not needs_grad:
        if p == 0.0 and result.dtype == weight_b.dtype == x.dtype:  # inference: one addmm onto the result
            return _add_update(result, F.linear(x.reshape(-1, x.shape[-1]), weight_a).t(), weight_b, scaling)
        return result + _plain_update(x, weight_a, weight_b, scaling, p, keys).to(result.dtype)
    return LoraUpdate.apply(x, result, weight_a, weight_b, scaling, p, keys)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    scaling: float,
    p: float = 0.0,
    keys: tuple[int, int] | None = None,
) -> torch.Tensor:
    """F.linear(x, weight, bias) + scaling · B A dropout_p(x) for a frozen weight and bias."""
    if p > 0.0 and keys is None:
        keys = draw_keys()
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight_a.requires_grad or weight_b.requires_grad
    )
    if not needs_grad:
        y = F.linear(x, weight, bias)
        if p > 0.0:
            return y.add_(_plain_update(x, weight_a, weight_b, scaling, p, keys))
        # inference: the low-rank term added inside one addmm, with no N x out temporaries
        h = F.linear(x.reshape(-1, x.shape[-1]), weight_a)
        y.view(-1, y.shape[-1]).addmm_(h, weight_b.t(), alpha=scaling)
        return y
    return LoraLinear.apply(x, weight, bias, weight_a, weight_b, scaling, p, keys)


def linear_applies(
    x: torch.Tensor, base: torch.nn.Module, weight_a: torch.Tensor, weight_b: torch.Tensor
) -> bool:
    """The whole-layer function: a plain nn.Linear, frozen, every tensor of one dtype and device."""
    if type(base) is not torch.nn.Linear or base.weight.requires_grad:
        return False
    if base.bias is not None and base.bias.requires_grad:
        return False
    dtype, device = base.weight.dtype, base.weight.device
    tensors = (x, weight_a, weight_b) + ((base.bias,) if base.bias is not None else ())
    if any(t.dtype != dtype or t.device != device for t in tensors):
        return False
    return applies(x, weight_a)


def applies(x: torch.Tensor, weight_a: torch.Tensor) -> bool:
    """Where the fused update is exact: floating inputs on the adapter's device, no autocast; not inside
    torch.compile, which traces the plain modules and plans their memory itself."""
    if not (x.is_floating_point() and weight_a.is_floating_point()) or x.device != weight_a.device:
        return False
    if torch.compiler.is_compiling():
        return False
    if x.dim() < 1 or x.shape[-1] != weight_a.shape[1]:
        return False
    # meta tensors (peftrun estimate) have no autocast state to ask about
    return x.device.type == "meta" or not torch.is_autocast_enabled(x.device.type)
