import numpy as np
import pytest

from edgemoe.quant.intmath import exact_matmul


@pytest.mark.parametrize("abits,bbits,k", [(32, 16, 768), (32, 16, 192), (24, 24, 64), (17, 24, 129),
                                           (8, 8, 16), (32, 32, 8)])
def test_exact_matmul_equals_int64(abits, bbits, k):
    rng = np.random.default_rng(abits * 1000 + k)
    a = rng.integers(-(1 << (abits - 1)), 1 << (abits - 1), size=(7, k), dtype=np.int64)
    b = rng.integers(-(1 << (bbits - 1)), 1 << (bbits - 1), size=(k, 5), dtype=np.int64)
    a[0, :] = -(1 << (abits - 1))          # extremes: most negative everywhere
    b[:, 0] = -(1 << (bbits - 1))
    a[1, :] = (1 << (abits - 1)) - 1
    want = a @ b
    np.testing.assert_array_equal(exact_matmul(a, b), want)


def test_exact_matmul_batched_and_shape_error():
    rng = np.random.default_rng(1)
    a = rng.integers(-2**20, 2**20, size=(3, 4, 64))
    b = rng.integers(-2**20, 2**20, size=(3, 64, 4))
    np.testing.assert_array_equal(exact_matmul(a, b), a @ b)
    with pytest.raises(ValueError, match="inner dimensions"):
        exact_matmul(a, b[:, :5])
