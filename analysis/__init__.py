"""The science layer: spectra, ranks, span dimensions, ablations, the paper's
networks and their training, data sets, memorization probes and sweeps.

Names are imported on first use, so that ``import analysis`` stays cheap and
the command-line tool starts fast.
"""

from __future__ import annotations

import importlib

# Public name -> submodule that defines it. Each submodule owns its entries.
_EXPORTS: dict[str, str] = {
    # spectra, ranks, ablations, alignment, the memorization report
    "eigs": "spectra",
    "svds": "spectra",
    "rank_measures": "ranks",
    "RankMeasures": "ranks",
    "rank_bound": "ranks",
    "RankBound": "ranks",
    "span_dimension": "ranks",
    "SpanDimension": "ranks",
    "svd_ablation": "ablation",
    "AblationResult": "ablation",
    "span_alignment": "alignment",
    "Alignment": "alignment",
    "eigenvector_images": "alignment",
    "memorization_report": "report",
    "MemorizationReport": "report",
    # configs, sweeps and the demo
    "ConfigError": "config",
    "load_config": "config",
    "save_config": "config",
    "run_sweep": "sweep",
    "load_results": "sweep",
    "run_demo": "demo",
    # training (module analysis.training, so analysis.train is the function)
    "train": "training",
    "TrainHistory": "training",
    "memorization_probe": "probes",
    "ProbeResult": "probes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"analysis.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
