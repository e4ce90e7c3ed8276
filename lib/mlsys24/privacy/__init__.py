"""Private inference under homomorphic encryption: SmartPAF (Tong et al., MLSys 2024).

- :mod:`.paf` — polynomial approximations of sign (composite f∘g, α=7 minimax, 27-degree least squares),
  ReLU / MaxPool PAF layers, model surgery.
- :mod:`.techniques` — Coefficient Tuning, Progressive Approximation, Alternate Training, Dynamic vs
  Static Scale, and the technique-set ablation.
- :mod:`.ckks` — TenSEAL CKKS: 128-bit context, encrypted PAF evaluation, per-level cost model,
  encrypted conv + PAF-ReLU layer on packed images (imports TenSEAL only when called).
- :mod:`.digits` / :mod:`.ablation` — the CPU testbed (sklearn digits CNN) and its study driver;
  :mod:`.ckks_bench` — the committed CKKS timing run (``python -m mlsys24.privacy.ckks_bench``).
"""

from .paf import (
    PAF_FAMILIES,
    PAF_LABELS,
    SMARTPAF_PAFS,
    MaxPoolPAF,
    ReLUPAF,
    SignPAF,
    components_of,
    make_sign,
    paf_info,
    replace_nonpolynomial,
)
from .techniques import (
    TECHNIQUES,
    TechniqueConfig,
    apply_technique,
    coefficient_tuning,
    run_ablation,
    to_static,
)

__all__ = [
    "PAF_FAMILIES", "PAF_LABELS", "SMARTPAF_PAFS", "MaxPoolPAF", "ReLUPAF", "SignPAF", "components_of",
    "make_sign", "paf_info", "replace_nonpolynomial", "TECHNIQUES", "TechniqueConfig", "apply_technique",
    "coefficient_tuning", "run_ablation", "to_static",
]
