"""The forward-only core: seeded noise, the population engines, fitness shaping (imports only torch).

* :mod:`nograd.core.noise` - noise for (seed, generation, member, parameter), regenerated on demand;
* :mod:`nograd.core.engine` - perturbed forwards in place or batched, and gradient accumulation;
* :mod:`nograd.core.shaping` - centered ranks, z-scores, NaN/inf handling;
* :mod:`nograd.core.allocator` - the malloc setting for population evaluation;
* :mod:`nograd.core.distributed` - a population shared between processes (torch.distributed);
* :mod:`nograd.core.options` - documented, checked config fields;
* :mod:`nograd.core.assets` - files that installed data packages ship;
* :mod:`nograd.core.errors` - :class:`UsageError`, the user's mistakes as one-line messages.
"""
