"""Decoupled-momentum SGD (DeepKD, DOT): one momentum buffer per gradient component.

* ``decoupled.py``: the optimizers (``DecoupledMomentumSGD``, ``DeepKDOptimizer``,
  ``DOTOptimizer``): param groups, state, checkpoints; the algorithm in their docstring.
* ``functional.py``: the paper update as free functions over tensor lists.
* ``official.py``: the emulation of the released reference optimizer (``compat="official"``).
* ``blocking.py``: CPU cache blocking of multi-pass foreach updates.
"""

from .decoupled import (
    COMPAT_MODES,
    DEEPKD_COMPONENTS,
    DOT_COMPONENTS,
    DecoupledMomentumSGD,
    DeepKDOptimizer,
    DOTOptimizer,
)

__all__ = ["COMPAT_MODES", "DEEPKD_COMPONENTS", "DOT_COMPONENTS", "DOTOptimizer", "DecoupledMomentumSGD",
           "DeepKDOptimizer"]
