"""Zeroth-order optimizers with a ``torch.optim`` interface, and their gradient estimators.

Optimizers (``opt.step(closure)``, the closure returns the loss without ``backward()``):

* :class:`MeZO` - ZO-SGD / SPSA at inference memory (Malladi et al. 2023).
* :class:`ZOSign` - ZO-signSGD (Liu et al. 2019).
* :class:`ZOMomentum` - ZO-SGD with momentum, full or seed-replayed buffer.
* :class:`ZOAdam` - Adam on the SPSA estimate.
* :class:`HiZOO` - diagonal-Hessian-preconditioned ZO-SGD (Zhao et al. 2024).
* :class:`ForwardGradient` - forward gradient descent with ``torch.func.jvp``
  (Baydin et al. 2022); ``opt.step(fn)`` with ``fn(model) -> loss``.

Estimators (fill ``.grad``, then any torch optimizer steps): :class:`SPSAEstimator`,
:class:`HiZOOEstimator`, :class:`ForwardGradientEstimator`.

Trajectories: :func:`replay` rebuilds the final weights from the initial ones and the log;
``nograd replay`` (reading and writing the files) is :mod:`nograd.workbench.replay`.
"""

from .adam import ZOAdam
from .base import Evaluation, ZOOptimizer
from .estimators import ForwardGradientEstimator, HiZOOEstimator, SPSAEstimator, ZONonFiniteError
from .forward_grad import ForwardGradient
from .hizoo import HiZOO
from .mezo import MeZO
from .momentum import ZOMomentum
from .replay import read_trajectory, replay
from .sign import ZOSign

__all__ = [
    "Evaluation",
    "ForwardGradient",
    "ForwardGradientEstimator",
    "HiZOO",
    "HiZOOEstimator",
    "MeZO",
    "SPSAEstimator",
    "ZOAdam",
    "ZOMomentum",
    "ZONonFiniteError",
    "ZOOptimizer",
    "ZOSign",
    "read_trajectory",
    "replay",
]
