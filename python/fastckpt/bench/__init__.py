"""Benchmark harness behind `fastckpt bench`: synthetic checkpoints, fresh-process loads, ceilings, reports.

Modules: `generate` (checkpoints, cached), `contenders` (who loads), `worker` (one load in a fresh
process), `coldcache` (page-cache eviction and residency), `ceilings` (physical limits), `runner`
(the interleaved schedule), `summary` (medians and pairwise ratios), `report` (table, JSON, plot),
`cli` (`fastckpt bench`). Only the worker, the generator and the GPU ceilings import torch.
"""
