"""Pure numerical helpers (numpy, scipy, tensorly): no ONNX inside.

- `vbmf`: analytic empirical VBMF rank estimation (Nakajima et al.).
- `decompose`: Tucker-2 / Tucker-1 / truncated SVD, rank-selection rules and least-squares refits.
"""

from onnxcomp.linalg.vbmf import EVBMFResult, evbmf, evbmf_max_rank, evbmf_rank, evbmf_spectrum

__all__ = ["EVBMFResult", "evbmf", "evbmf_max_rank", "evbmf_rank", "evbmf_spectrum"]
