"""Where DreamStream keeps its caches on disk, set up for the libraries that read their place from the environment.

torch's compiler (inductor) and Triton find their caches through env vars, so this module writes them; it is the
one place outside the edges that touches the process environment, and only for those libraries.
"""

from __future__ import annotations

import os
from pathlib import Path


def inductor_cache_dir() -> Path:
    """Where inductor's caches go: TORCHINDUCTOR_CACHE_DIR if the user set it, else ~/.cache/dreamstream/inductor,
    where a restart (or the next container, on a shared volume) finds what the last one compiled.

    torch writes its own default (/tmp/torchinductor_USER) into the variable the first time it asks for the folder,
    so a value equal to that default is taken as unset.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    ours = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dreamstream" / "inductor"
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not current or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(ours)
        if os.environ.get("TRITON_CACHE_DIR", "").startswith(os.path.abspath(default_cache_dir())):
            del os.environ["TRITON_CACHE_DIR"]  # torch put Triton's cache under its default too: follow ours
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
