"""What this CPU can do, from /proc/cpuinfo, for decisions that do not need the native build."""

from __future__ import annotations

import functools
import platform

# Any of these gives ORT's x86 int8 GEMM an exact u8 x s8 dot product (vpdpbusd or tdpbusd).
_EXACT_INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def cpu_fields() -> dict[str, str] | None:
    """The first CPU's /proc/cpuinfo fields ("model name", "flags", ...); None where the file
    cannot be read."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break  # the first CPU's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return None
    return fields or None


def cpu_flags() -> frozenset[str] | None:
    """The first CPU's feature flags; None where /proc/cpuinfo cannot be read."""
    fields = cpu_fields()
    return frozenset(fields["flags"].split()) if fields and "flags" in fields else None


def ort_int8_saturates() -> bool:
    """Whether ORT's u8 x s8 GEMM on this CPU uses vpmaddubsw, whose int16 pair sums saturate
    (x86 without VNNI or AMX). An x86 CPU whose flags cannot be read counts as saturating: 7-bit
    weights cost a little accuracy, a saturated sum can cost a lot."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    flags = cpu_flags()
    return flags is None or not (flags & _EXACT_INT8_FLAGS)
