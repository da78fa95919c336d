"""Ask/tell evolution strategies on flat float64 vectors (losses, lower is better).

One file per strategy, all sharing :class:`~nograd.strategies.base.Strategy`:

=============  =========================  =====================================================
key            class                      reference
=============  =========================  =====================================================
``cma``        :class:`CMAES`             Hansen 2016, "The CMA Evolution Strategy: A Tutorial"
``sep-cma``    :class:`SepCMAES`          Ros & Hansen 2008
``lm-ma-es``   :class:`LMMAES`            Loshchilov, Glasmachers & Beyer 2019
``rm-es``      :class:`RmES`              Li & Zhang 2018
``snes``       :class:`SNES`              Schaul, Glasmachers & Schmidhuber 2011
``pgpe``       :class:`PGPE`              Sehnke et al. 2010 + ClipUp (Toklu et al. 2020)
``cem``        :class:`CEM`               De Boer et al. 2005
=============  =========================  =====================================================

Example:
    >>> from nograd.strategies.functions import sphere
    >>> es = ASK_TELL["sep-cma"]([0.5] * 10, sigma=0.3, seed=0)
    >>> for _ in range(50):
    ...     es.tell(sphere(es.ask()))
    >>> es.best_f < 1e-3
    True
"""

from nograd.strategies.base import Strategy
from nograd.strategies.cem import CEM
from nograd.strategies.cma import CMAES
from nograd.strategies.lm_ma_es import LMMAES
from nograd.strategies.pgpe import PGPE
from nograd.strategies.rm_es import RmES
from nograd.strategies.sep_cma import SepCMAES
from nograd.strategies.snes import SNES

ASK_TELL: dict[str, type[Strategy]] = {
    "cma": CMAES,
    "sep-cma": SepCMAES,
    "lm-ma-es": LMMAES,
    "rm-es": RmES,
    "snes": SNES,
    "pgpe": PGPE,
    "cem": CEM,
}

__all__ = ["ASK_TELL", "CEM", "CMAES", "LMMAES", "PGPE", "SNES", "RmES", "SepCMAES", "Strategy"]
