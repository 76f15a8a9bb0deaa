"""The attention function's implementations agree with each other."""
import jax
import numpy as np
import pytest

from ip2p_jax.models import layers


@pytest.mark.parametrize("shape", [(2, 300, 4, 8), (1, 64, 2, 16), (3, 77, 1, 32)])
def test_chunked_attention_equals_one_shot(shape):
  b, l, h, d = shape
  q, k, v = (np.random.default_rng(i).standard_normal((b, l, h, d)).astype(np.float32)
             for i in range(3))
  k, v = k[:, : l - 5], v[:, : l - 5]  # different key length (cross-attention)
  want = jax.nn.dot_product_attention(q, k, v, implementation="xla")
  # A tiny score budget forces many query blocks.
  got = layers.chunked_attention(q, k, v, max_score_bytes=b * h * 16 * (l - 5) * 4)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
  np.testing.assert_allclose(np.asarray(layers.dot_product_attention(q, k, v)), np.asarray(want),
                             atol=2e-6)


def test_chunked_attention_refuses_masks():
  q = np.zeros((1, 4, 1, 8), np.float32)
  with pytest.raises(ValueError, match="does not take masks"):
    layers.dot_product_attention(q, q, q, is_causal=True, implementation="chunked")
