"""Evaluation of instruction edits (issue: "ip2p eval").

  score_edit(example, output)   success / PSNR / PSNR outside of one shapes-world edit,
                                judged from its exact scene graphs (shapes_scoring)
  summarize(scores), scalars(summary)   per edit type, held-out combinations (aggregate)
  ClipSimilarity(folder)        the paper's CLIP metrics with our Flax CLIP (clip_similarity)
  evaluate(pipe, examples, ...) edit held-out examples with a pipeline and score them
  vae_psnr(pipe, images)        the VAE's reconstruction PSNR, the cap of every edit's
  heldout_examples, dataset_examples   where the examples come from (examples)
  report.markdown, report.sheet, report.sweep_*   reports for people (the report module)
  scene_match                   layout-free colour judge of generated pictures against
                                shapes-world captions and edits (text-to-image, synth)
"""
from ip2p_jax.metrics.aggregate import CLIP_KEYS, scalars, summarize
from ip2p_jax.metrics.clip_similarity import DEFAULT_CLIP, ClipSimilarity, similarities
from ip2p_jax.metrics.evaluate import edit_examples, evaluate
from ip2p_jax.metrics.examples import dataset_examples, heldout_examples
from ip2p_jax.metrics.reconstruction import vae_psnr
from ip2p_jax.metrics.shapes_scoring import psnr, score_edit

__all__ = [
    "CLIP_KEYS", "DEFAULT_CLIP", "ClipSimilarity", "dataset_examples", "edit_examples",
    "evaluate", "heldout_examples", "psnr", "scalars", "score_edit", "similarities",
    "summarize", "vae_psnr",
]
