"""Block sizes of the flash-attention kernels, chosen by shape per platform (overridable), the platform a trace
lowers for, and the checks that refuse a platform, a shape or a dtype a kernel cannot lower for, in one line."""
from __future__ import annotations

import dataclasses

import jax

PLATFORMS = ("cpu", "gpu", "tpu")  # cpu: Pallas interpret mode only (no compiled CPU lowering)
MIN_BLOCK = 16  # Triton's tl.dot needs >= 16 rows and columns
MAX_BLOCK = 128
TPU_BLOCK = 128  # Mosaic: a (block,) row of LSE / bias lies on the 128 lanes
TPU_BLOCKS = (512, 256, 128)  # tried largest first: fewer grid steps and key-loop turns, wider MXU tiles
TPU_PAD_SLACK = 1 / 16  # a larger block may pad the lengths by this much more than blocks of 128 do
TPU_DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Queries per block (the grid) and keys per block (the inner online-softmax loop); None: chosen by shape."""

    block_q: int | None = None
    block_k: int | None = None


def platform_of_default_backend() -> str:
    """"cpu" | "gpu" | "tpu" | another name, from `jax.default_backend()` (CUDA and ROCm count as "gpu")."""
    name = jax.default_backend()
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


def target_platform(platform: str | None = None) -> str:
    """The platform the kernels lower for: `platform` if given; else the device kind of the mesh set by
    `jax.set_mesh` (so a CPU host compiling for a TPU topology's mesh lowers through Mosaic, not interpret
    mode); else the default backend's."""
    if platform is not None:
        return platform
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if device is not None:
        return "gpu" if device.platform in ("gpu", "cuda", "rocm") else device.platform
    return platform_of_default_backend()


def resolve_interpret(interpret: bool | None, platform: str) -> bool:
    """None: interpret mode exactly when the platform is cpu (Pallas lowers for GPU and TPU only)."""
    if platform not in PLATFORMS:
        raise ValueError(f"the 'flash' attention kernel runs on {PLATFORMS} (cpu in interpret mode), not on "
                         f"{platform!r}; use backend 'xla' or 'blocked'.")
    if interpret is None:
        return platform == "cpu"
    if platform == "cpu" and not interpret:
        raise ValueError("the 'flash' attention kernel has no compiled CPU lowering; run it with interpret=True "
                         "(the default on cpu) or use backend 'xla'.")
    return bool(interpret)


def _power_of_two_at_least(n: int, low: int, high: int) -> int:
    p = low
    while p < min(n, high):
        p *= 2
    return p


def _padded(lengths: tuple[int, ...], block: int) -> int:
    return sum(-(-n // block) * block for n in lengths)


def tpu_block(*lengths: int) -> int:
    """The largest of `TPU_BLOCKS` that pads `lengths` (each to its multiple) by at most `TPU_PAD_SLACK` more
    than blocks of 128 do: 4429 queries -> 512 (4608), 4429 + 1032 keys -> 256 (4608 + 1280); 37 -> 128."""
    lengths = tuple(n for n in lengths if n) or (1,)
    least = _padded(lengths, TPU_BLOCK)
    return next(b for b in TPU_BLOCKS if _padded(lengths, b) <= least * (1 + TPU_PAD_SLACK))


def choose_block_sizes(nq: int, nk: int, head_dim: int, platform: str, given: BlockSizes | None = None,
                       nr: int = 0) -> tuple[int, int]:
    """(block_q, block_k): powers of two in [16, 128] covering short sequences (64 keys per block past head_dim
    64 on GPU, to keep the (block_q, block_k) tile and two (block, D) tiles in registers); on TPU 128, 256 or
    512 by `tpu_block` (block_k over both key segments: nk base keys, nr reference keys)."""
    given = given or BlockSizes()
    if platform == "tpu":
        auto_q, auto_k = tpu_block(nq), tpu_block(nk, nr)
    else:
        nk = max(nk, nr)
        auto_q = _power_of_two_at_least(nq, MIN_BLOCK, MAX_BLOCK)
        auto_k = _power_of_two_at_least(nk, MIN_BLOCK, MAX_BLOCK if head_dim <= 64 else 64)
    bq = auto_q if given.block_q is None else given.block_q
    bk = auto_k if given.block_k is None else given.block_k
    for name, b in (("block_q", bq), ("block_k", bk)):
        if not isinstance(b, int) or b < 1:
            raise ValueError(f"flash attention {name} must be a positive int, got {b!r}.")
    return bq, bk


def check_supported(platform: str, interpret: bool, head_dim: int, block_q: int, block_k: int,
                    dtype=None) -> None:
    """Refuse, in one line, what the compiled kernels cannot lower (interpret mode runs any shape)."""
    if interpret:
        return
    if platform == "tpu" and dtype is not None and jax.numpy.dtype(dtype).name not in TPU_DTYPES:
        raise ValueError(f"the 'flash' kernel on TPU takes {' or '.join(TPU_DTYPES)} q, k, v, got "
                         f"{jax.numpy.dtype(dtype).name}; cast them (e.g. --dtype bf16) or use backend 'xla'.")
    def is_pow2(n): return n & (n - 1) == 0
    if platform == "gpu":
        if not (is_pow2(head_dim) and 16 <= head_dim <= 256):
            raise ValueError(f"the 'flash' kernel on GPU needs a head_dim that is a power of two in [16, 256], "
                             f"got {head_dim}; use backend 'xla' or 'blocked'.")
        if not (is_pow2(block_q) and is_pow2(block_k) and min(block_q, block_k) >= MIN_BLOCK):
            raise ValueError(f"the 'flash' kernel on GPU needs block sizes that are powers of two >= {MIN_BLOCK}, "
                             f"got block_q={block_q}, block_k={block_k}.")
    if platform == "tpu" and (block_q % TPU_BLOCK or block_k % TPU_BLOCK):
        raise ValueError(f"the 'flash' kernel on TPU needs block sizes that are multiples of {TPU_BLOCK}, got "
                         f"block_q={block_q}, block_k={block_k}.")
