"""Exactness of the integer helpers against Python big-int arithmetic (property tests)."""
import numpy as np
import pytest
from fractions import Fraction
from hypothesis import given, settings, strategies as st

from edgemoe.quant.fixed import (Fmt, FormatError, Overflow, Rounding, SatCounter, acc_bits_needed, mul,
                         requantize, shift_round)

I62 = st.integers(-(1 << 61), (1 << 61) - 1)


def ref_round(num: Fraction, mode: Rounding) -> int:
    """Reference rounding of an exact rational, written independently of quant.fixed."""
    fl = num.numerator // num.denominator
    rem = num - fl
    if mode is Rounding.TRUNC:
        return fl
    if mode is Rounding.HALF_UP:
        return fl + (1 if rem >= Fraction(1, 2) else 0)
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and fl % 2 == 1):
        return fl + 1
    return fl


@settings(max_examples=400, deadline=None)
@given(x=I62, shift=st.integers(0, 40), mode=st.sampled_from(list(Rounding)))
def test_shift_round_exact(x, shift, mode):
    got = int(shift_round(np.int64(x), shift, mode))
    assert got == ref_round(Fraction(x, 1 << shift), mode)


@settings(max_examples=200, deadline=None)
@given(x=st.integers(-(1 << 40), 1 << 40), shift=st.integers(1, 20))
def test_shift_left_exact(x, shift):
    assert int(shift_round(np.int64(x), -shift)) == x * (1 << shift)


@settings(max_examples=300, deadline=None)
@given(q=I62, sbits=st.integers(20, 62), sfrac=st.integers(0, 20), dbits=st.integers(2, 40),
       dfrac=st.integers(0, 20), mode=st.sampled_from(list(Rounding)),
       ovf=st.sampled_from(list(Overflow)))
def test_requantize_exact(q, sbits, sfrac, dbits, dfrac, mode, ovf):
    src = Fmt(sbits, min(sfrac, sbits))
    dst = Fmt(dbits, min(dfrac, dbits))
    q = max(src.min_int, min(src.max_int, q))
    sat = SatCounter()
    got = int(requantize(np.int64(q), src, dst, mode, ovf, sat, "t"))
    r = ref_round(Fraction(q, 1) * Fraction(2) ** (dst.frac - src.frac), mode)
    lo, hi = -(1 << (dbits - 1)), (1 << (dbits - 1)) - 1
    if ovf is Overflow.SAT:
        want = min(hi, max(lo, r))
    else:
        want = ((r - lo) % (1 << dbits)) + lo
    assert got == want
    assert sat.saturated("t") == (0 if lo <= r <= hi else 1)


@settings(max_examples=200, deadline=None)
@given(a=st.integers(-(1 << 31), (1 << 31) - 1), b=st.integers(-(1 << 15), (1 << 15) - 1))
def test_mul_exact(a, b):
    assert int(mul(np.int64(a), np.int64(b), Fmt(32, 22), Fmt(16, 14))) == a * b


def test_mul_refuses_too_wide():
    with pytest.raises(FormatError, match="needs 64 bits"):
        mul(1, 1, Fmt(32, 22), Fmt(32, 22))


def test_quantize_round_trip_and_saturation_counted():
    f = Fmt(8, 4)
    sat = SatCounter()
    x = np.array([0.0, 1.0625, -8.0, 7.9375, 8.0, -8.1, 100.0, 0.03125, 0.09375])
    q = f.quantize(x, Rounding.HALF_EVEN, Overflow.SAT, sat, "x")
    assert q.tolist() == [0, 17, -128, 127, 127, -128, 127, 0, 2]  # ties to even: .5 -> 0, 1.5 -> 2
    assert sat.saturated("x") == 3
    assert np.all(f.dequantize(q[:4]) == x[:4])
    qw = f.quantize(np.array([8.0]), overflow=Overflow.WRAP)
    assert qw.tolist() == [-128]


def test_quantize_torch_round_trip():
    torch = pytest.importorskip("torch")
    f = Fmt(16, 14)
    t = torch.tensor([0.5, -0.25, 1.999])
    q = f.quantize(t)
    assert q.dtype == torch.int64
    assert torch.allclose(f.dequantize(q).float(), t, atol=f.lsb)


def test_non_finite_named():
    with pytest.raises(FormatError, match="tensor 'w'"):
        Fmt(16, 8).quantize(np.array([np.nan]), name="w")


def test_bad_formats():
    with pytest.raises(FormatError, match="frac=20 > bits=16"):
        Fmt(16, 20)
    with pytest.raises(FormatError, match="bits=70"):
        Fmt(70, 2)


def test_acc_bits_needed():
    assert acc_bits_needed(Fmt(32, 22), Fmt(16, 14), 768) == 58
    assert acc_bits_needed(Fmt(32, 22), Fmt(16, 14), 1) == 48
