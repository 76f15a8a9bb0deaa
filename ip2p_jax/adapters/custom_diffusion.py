"""Custom Diffusion (Kumari et al., "Multi-Concept Customization of Text-to-Image
Diffusion", CVPR 2023): fine-tune only the cross-attention key and value projections
(``attn2.to_k``/``to_v``; optionally ``to_q`` and ``to_out``) and new modifier-token
embeddings. An adapter is the change of those kernels, ``dW``, applied as
``W + scale * dW``.

Several concepts trained apart are joined by the paper's constrained optimisation
(Sec. 3.2, Eq. 4): for each adapted kernel find ``W`` closest to the base ``W0`` on
regularisation text features ``C_reg`` while reproducing every concept's own outputs
on its text features ``C_i``::

    min_W || (W - W0) C_reg^T ||_F   s.t.   W C^T = V,   C = [C_1; ...; C_N],
                                             V = [W_1 C_1^T, ..., W_N C_N^T]

whose closed form (Lagrange multipliers) is, with ``M = C_reg^T C_reg``,
``W = W0 + (V - W0 C^T) (C M^-1 C^T)^+ C M^-1`` (``+``: pseudo-inverse, so repeated
or conflicting feature rows are met in the least-squares sense).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ip2p_jax.adapters import targets as targets_lib

Path = tuple[str, ...]
DEFAULT_TARGETS = ("to_k", "to_v")


def select(unet_params: Mapping, targets: Sequence[str] = DEFAULT_TARGETS) -> list[Path]:
  """Cross-attention projections named by ``targets`` (a subset of to_q/to_k/to_v/to_out_0)."""
  bad = [t for t in targets if t not in targets_lib.ATTENTION]
  if bad:
    raise ValueError(f"custom_diffusion trains attention projections only; {bad} are not "
                     f"among {', '.join(targets_lib.ATTENTION)}")
  return targets_lib.select(unet_params, tuple(targets), cross_only=True)


def deltas(trained_unet: Mapping, base_unet: Mapping, paths: Sequence[Path]) -> dict:
  """``path -> W_trained - W_base`` (float32 numpy) of the trained kernels."""
  new, old = targets_lib.kernels(trained_unet), targets_lib.kernels(base_unet)
  return {p: np.asarray(new[p], np.float32) - np.asarray(old[p], np.float32) for p in paths}


def merge(base_unet: Mapping, adapters: Sequence[tuple[dict, float]]) -> dict:
  """``base_unet`` with ``W + sum_i s_i dW_i`` for every ``(deltas, scale)``."""
  total: dict[Path, np.ndarray] = {}
  for d, scale in adapters:
    for p, v in d.items():
      total[p] = total[p] + scale * v if p in total else scale * v
  return targets_lib.add_to_kernels(base_unet, total)


def constrained_merge(base_kernel: np.ndarray, kernels: Sequence[np.ndarray],
                      features: Sequence[np.ndarray], reg_features: np.ndarray,
                      ridge: float = 1e-6) -> np.ndarray:
  """The paper's closed-form merge of one key/value kernel (our layout ``[d, out]``,
  features ``[tokens, d]``): returns the merged kernel ``[d, out]``. ``ridge`` (relative
  to the mean diagonal of ``M``) keeps ``M`` invertible when the regularisation features
  span fewer than ``d`` directions."""
  w0 = np.asarray(base_kernel, np.float64).T                 # [out, d]
  c = np.concatenate([np.asarray(f, np.float64) for f in features])       # [s, d]
  v = np.concatenate([np.asarray(f, np.float64) @ np.asarray(k, np.float64)
                      for f, k in zip(features, kernels)]).T  # [out, s]
  creg = np.asarray(reg_features, np.float64)
  m = creg.T @ creg
  m += ridge * max(np.trace(m) / len(m), 1e-12) * np.eye(len(m))
  d = np.linalg.solve(m, c.T).T                              # C M^-1, [s, d]
  residual = v - w0 @ c.T                                    # [out, s]
  w = w0 + residual @ np.linalg.pinv(d @ c.T) @ d
  return w.T.astype(np.float32)


def merge_concepts(base_unet: Mapping, concept_deltas: Sequence[Mapping[Path, np.ndarray]],
                   concept_features: Sequence[np.ndarray], reg_features: np.ndarray) -> dict:
  """One Custom Diffusion delta from several: per kernel any concept adapts, the
  constrained merge of ``W0 + dW_i`` over the concepts (a concept that leaves a kernel
  alone contributes ``W0`` there). ``concept_features[i]``: the text-encoder states of
  concept ``i``'s prompts (rows: tokens up to the end token)."""
  base = targets_lib.kernels(base_unet)
  paths = list(dict.fromkeys(p for d in concept_deltas for p in d))
  out = {}
  for p in paths:
    w0 = np.asarray(base[p], np.float32)
    ws = [w0 + d[p] if p in d else w0 for d in concept_deltas]
    out[p] = constrained_merge(w0, ws, concept_features, reg_features) - w0
  return out
