"""`flan_mini`: a small FLAN-2022-style training mixture over the real data folder.

FLAN 2022 mixes its submixtures with fixed weights (Flan2021 0.4, T0 0.32, NIV2 0.2, CoT 0.05,
dialog 0.03; Longpre et al. 2023, flan/v2/mixtures.py), each submixture examples-proportional
with a per-task cap. Of those, this project has T0 and CoT (+ GSM8K) on disk, so `flan_mini`
keeps their relative weights 0.32 : 0.05 (CoT ~ 13.5% of examples); the caps are those of the
submixtures (`flan_jax_tasks.t0.CAP_PER_TASK`, `flan_jax_tasks.flan_cot.CAP_PER_TASK`).
"""

from __future__ import annotations

from flan_jax import data

T0_WEIGHT = 0.32
COT_WEIGHT = 0.05

data.register_mixture(data.Mixture(
    "flan_mini", [("t0", T0_WEIGHT), ("flan_cot", COT_WEIGHT)],
    description="T0 (all clusters) + FLAN CoT + GSM8K with FLAN 2022's submixture weights"))
