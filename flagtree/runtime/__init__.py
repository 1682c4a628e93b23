"""flagtree's runtime: launch plans (the compiled executable) and the on-disk code cache."""

from flagtree.runtime.cache import CacheStats, DiskCache, cache_dir, cache_key, cache_stats, reset_cache_stats
from flagtree.runtime.plan import DeviceConstant, LaunchPlan, PlanWriter

__all__ = [
    "CacheStats", "DeviceConstant", "DiskCache", "LaunchPlan", "PlanWriter", "cache_dir", "cache_key",
    "cache_stats", "reset_cache_stats",
]
