"""gradcheck and assert_same: each case here once let a wrong gradient or a wrong value pass (found by the outside
tests of "No silent wrong answers"; the test names say what)."""
import numpy
import pytest

import tinybn
from tinybn import functional as F

rng = numpy.random.default_rng(9)


def _define_double(name, rule):
    """The op y = 2x, with a backward that returns ``rule(dy)`` (right only for dy · 2)."""
    from tinybn import ops
    from tinybn.autograd import Cache

    ops.define(name, lambda a: (a * 2.0, Cache()), lambda dy, cache: (rule(dy),))
    return name

DOUBLE_RIGHT = _define_double("tests.double", lambda dy: dy * 2.0)

DOUBLE_WRONG = [_define_double("tests.double_zero_gradient", lambda dy: dy * 0.0),
                _define_double("tests.double_triple_gradient", lambda dy: dy * 3.0)]

def test_gradcheck_checks_a_non_contiguous_float64_leaf():
    """gradcheck perturbed x.data.reshape(-1), a copy for a strided leaf: every numerical derivative was 0, so a
    backward returning zeros passed, and a right one failed."""
    base = rng.standard_normal((4, 6))
    leaf = lambda: tinybn.Tensor(base.T, requires_grad=True)       # noqa: E731 - an F-ordered view, not copied
    assert not leaf().data.flags.c_contiguous
    from tinybn.autograd import apply

    assert tinybn.gradcheck(lambda t: apply(DOUBLE_RIGHT, t), [leaf()])["ok"]
    for wrong in DOUBLE_WRONG:
        with pytest.raises(AssertionError, match="input 0"):
            tinybn.gradcheck(lambda t: apply(wrong, t), [leaf()])
    strided = tinybn.Tensor(rng.standard_normal((5, 8))[::2, 1::3], requires_grad=True)
    assert tinybn.gradcheck(lambda t: F.sigmoid(t) * t, [strided])["ok"]

def test_gradcheck_accepts_an_empty_leaf():
    report = tinybn.gradcheck(lambda t: t * 2.0, [tinybn.Tensor(numpy.zeros((0, 3)), requires_grad=True)])
    assert report["ok"] and report["where"] is None

def test_gradcheck_and_assert_same_fail_on_nan():
    """`error > tolerance` is False for NaN, so a NaN gradient or output passed both checkers."""
    from tinybn import ops
    from tinybn.autograd import Cache, apply

    if "tests.nan_gradient" not in ops.names():
        ops.define("tests.nan_gradient", lambda a: (a * 2.0, Cache()), lambda dy, cache: (dy * numpy.nan,))
    x = tinybn.tensor(numpy.ones(3), requires_grad=True)
    with pytest.raises(AssertionError, match="analytic nan"):
        tinybn.gradcheck(lambda t: apply("tests.nan_gradient", t), [x])
    with pytest.raises(AssertionError):
        tinybn.gradcheck(lambda t: t * numpy.nan, [x])
    with pytest.raises(AssertionError, match="output differs"):
        tinybn.assert_same(lambda t: t * numpy.nan, lambda t: t * 2.0, [x])
    tinybn.assert_same(lambda t: t * numpy.inf, lambda t: t * numpy.inf, [x], check_grad=False)   # equal infinities

def test_gradcheck_of_one_array_given_twice_checks_each_input_alone():
    x = tinybn.tensor(numpy.random.default_rng(0).standard_normal((3, 4)), requires_grad=True)
    y = tinybn.Tensor(x.data[1:], requires_grad=True)       # a view overlapping x
    assert tinybn.gradcheck(lambda a, b: a * b, [x, x])["ok"]
    assert tinybn.gradcheck(lambda a, b: a[1:] * b, [x, y])["ok"]
    assert tinybn.gradcheck(lambda a, b: a[1:] * b, [x, y], raise_on_failure=False)["worst_abs"] < 1e-6

def test_assert_same_compares_dtypes_and_requires_grad():
    x = tinybn.tensor(numpy.ones((2, 3), dtype=numpy.float32), requires_grad=True)
    with pytest.raises(AssertionError, match="dtype float64"):
        tinybn.assert_same(lambda a: a * 2, lambda a: (a * 2).astype(numpy.float64), [x])
    with pytest.raises(AssertionError, match="requires_grad False"):
        tinybn.assert_same(lambda a: a * 2, lambda a: (a * 2).detach(), [x])

def test_assert_same_tells_an_infinity_from_a_finite_value_and_from_its_opposite():
    """inf <= atol + rtol·inf held, so a finite value passed for +inf, and −inf for +inf."""
    x = tinybn.tensor(numpy.array([1.0, 2.0, 3.0]), requires_grad=True)
    plus, minus = numpy.array([numpy.inf, 1, 1]), numpy.array([-numpy.inf, 1, 1])
    for fast, reference in [(numpy.ones(3), plus), (minus, plus)]:
        with pytest.raises(AssertionError, match=r"output differs from the reference at \(0,\)"):
            tinybn.assert_same(lambda a, f=fast: a * tinybn.tensor(f), lambda a, r=reference: a * tinybn.tensor(r), [x],
                               check_grad=False)
    tinybn.assert_same(lambda a: a * tinybn.tensor(plus), lambda a: a * tinybn.tensor(plus), [x], check_grad=False)

def test_gradcheck_fails_where_the_difference_quotient_is_infinite_or_nan():
    from tinybn import ops
    from tinybn.autograd import Cache, apply

    if "tests.jumps_to_inf" not in ops.names():
        ops.define("tests.jumps_to_inf", lambda a: (numpy.where(a > 1.0, numpy.inf, a), Cache()), lambda dy, cache: (dy,))
    x = tinybn.tensor(numpy.array([0.0, 1.0]), requires_grad=True)
    with pytest.raises(AssertionError, match=r"index \(1,\).*numeric -?inf"):
        tinybn.gradcheck(lambda a: apply("tests.jumps_to_inf", a), [x])
    report = tinybn.gradcheck(lambda a: a * numpy.nan, [x], raise_on_failure=False)
    assert not report["ok"] and report["where"] == "a (input 0), index (0,)"
