"""Procedural pedestrians and one writer per real on-disk dataset layout (no downloads needed).

Every writer ``write_X(root, *, seed=0, size=(128, 64), ...) -> root`` is byte-deterministic, refuses
a non-empty ``root`` and publishes the tree atomically (temp folder + rename), so the parsers in
``pedlightning.data.sources`` read synthetic and real data through the same code.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from pedlightning.data.progress import announce
from pedlightning.data.sources.attributes import PA100K_ATTRIBUTES
from pedlightning.data.synthetic.attributes import write_pa100k
from pedlightning.data.synthetic.captions import describe, tokenize
from pedlightning.data.synthetic.identity import (
    Identity,
    make_identities,
    make_identity,
)
from pedlightning.data.synthetic.luperson import (
    write_luperson_folder,
    write_luperson_shards,
)
from pedlightning.data.synthetic.pedes import (
    CUHK_PEDES_ID_START,
    write_cuhk_pedes,
    write_icfg_pedes,
    write_rstpreid,
)
from pedlightning.data.synthetic.reid import (
    write_dukemtmc,
    write_market1501,
    write_msmt17,
    write_occluded_duke,
)
from pedlightning.data.synthetic.render import render_background, render_person
from pedlightning.errors import ConfigError

__all__ = [
    "CUHK_PEDES_ID_START",
    "PA100K_ATTRIBUTES",
    "SYNTHETIC_WRITERS",
    "Identity",
    "describe",
    "make_identities",
    "make_identity",
    "render_background",
    "render_person",
    "synthesize",
    "tokenize",
    "write_cuhk_pedes",
    "write_dukemtmc",
    "write_icfg_pedes",
    "write_luperson_folder",
    "write_luperson_shards",
    "write_market1501",
    "write_msmt17",
    "write_occluded_duke",
    "write_pa100k",
    "write_rstpreid",
]

SYNTHETIC_WRITERS: dict[str, Callable[..., str]] = {
    "market1501": write_market1501,
    "dukemtmc": write_dukemtmc,
    "occluded_duke": write_occluded_duke,
    "msmt17": write_msmt17,
    "pa100k": write_pa100k,
    "cuhk_pedes": write_cuhk_pedes,
    "icfg_pedes": write_icfg_pedes,
    "rstpreid": write_rstpreid,
    "luperson": write_luperson_folder,
    "luperson_shards": write_luperson_shards,
    "luperson_ta": functools.partial(write_luperson_shards, with_text=True),
}
"""Dataset name -> writer; ``luperson_ta`` is ``write_luperson_shards`` with ``with_text=True``."""


def synthesize(name: str, root: str, **kwargs: Any) -> str:
    """Write synthetic ``name`` into ``root`` with its writer, saying so on stderr before and after (minutes for
    the larger sets; a progress bar on a terminal)."""
    if name not in SYNTHETIC_WRITERS:
        raise ConfigError(f"no synthetic writer for dataset {name!r}; available: {sorted(SYNTHETIC_WRITERS)}")
    announce(f"writing synthetic {name} to {root}")
    start = time.monotonic()
    SYNTHETIC_WRITERS[name](root, **kwargs)
    announce(f"wrote synthetic {name} to {root} in {time.monotonic() - start:.1f} s")
    return root
