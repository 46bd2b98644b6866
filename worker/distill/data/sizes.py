"""Byte counts: bounding decoded data before allocating it, and writing sizes the way people read them."""

from __future__ import annotations

from ..errors import DatasetError


def human_bytes(n: int) -> str:
    """Format `n` bytes as e.g. `1.5 GiB`, keeping the exact count for small values."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def ensure_decoded_fits(count: int, channels: int, size: tuple[int, int], limit: int) -> None:
    """Refuse (`dataset_too_large`) before allocating `count` uint8 images that would pass `limit` bytes."""
    h, w = size
    need = count * channels * h * w
    if need > limit:
        raise DatasetError(
            f"the {count} images decoded at {channels}x{h}x{w} need {need} bytes ({human_bytes(need)}), "
            f"over the {human_bytes(limit)} limit; use fewer or smaller images or raise "
            "data.max_decoded_bytes",
            code="dataset_too_large")
