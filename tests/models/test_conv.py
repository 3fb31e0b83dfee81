import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnsplit_jax.models.conv import conv2d, max_pool_2x2, select_conv_impl

SHAPES = [  # (H, Cin, Cout, k)
    (1, 16, 8, 3),
    (2, 16, 8, 3),
    (2, 8, 4, 5),
    (4, 12, 6, 5),
    (4, 12, 6, 1),
    (4, 8, 8, 3),
    (8, 5, 7, 3),
    (3, 4, 4, 3),  # odd size: unrolled handles any H, W
]


@pytest.mark.parametrize("h,cin,cout,k", SHAPES)
@pytest.mark.parametrize("impl", ["im2col", "unrolled", "auto"])
def test_formulations_equal_native(h, cin, cout, k, impl):
    kx, kw, kb = jax.random.split(jax.random.key(h * 100 + cin + k), 3)
    x = jax.random.normal(kx, (3, h, h + (1 if h == 3 else 0), cin))
    w = jax.random.normal(kw, (k, k, cin, cout)) * 0.3
    b = jax.random.normal(kb, (cout,))
    ref = conv2d(x, w, b, impl="native")
    got = conv2d(x, w, b, impl=impl)
    assert got.shape == ref.shape == (3, x.shape[1], x.shape[2], cout)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)

    # gradients w.r.t. input and kernel agree too (the splitters differentiate through convs)
    f = lambda impl_: lambda x_, w_: jnp.sum(jnp.sin(conv2d(x_, w_, b, impl=impl_)))  # noqa: E731
    gx_r, gw_r = jax.grad(f("native"), argnums=(0, 1))(x, w)
    gx, gw = jax.grad(f(impl), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx, gx_r, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gw, gw_r, rtol=1e-4, atol=1e-4)


def test_selection_rule():
    assert select_conv_impl(2, 2, 512, 512, 3, backend="cpu") == "unrolled"
    assert select_conv_impl(1, 1, 512, 512, 3, backend="cpu") == "unrolled"
    assert select_conv_impl(4, 4, 1088, 64, 5, backend="cpu") == "unrolled"
    assert select_conv_impl(16, 16, 256, 256, 1, backend="cpu") == "im2col"
    assert select_conv_impl(32, 32, 64, 64, 3, backend="cpu") == "native"
    assert select_conv_impl(4, 4, 512, 512, 3, backend="cpu") == "native"
    # an unrolled matrix over the size cap falls back to im2col
    assert select_conv_impl(2, 2, 8192, 8192, 3, backend="cpu") == "im2col"
    for backend in ("gpu", "tpu"):
        assert select_conv_impl(2, 2, 512, 512, 3, backend=backend) == "native"


def test_bad_shapes_and_impl():
    with pytest.raises(ValueError, match="matching Cin"):
        conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 4, 2)))
    with pytest.raises(ValueError, match="unknown conv impl"):
        conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 3, 2)), impl="fft")


def test_max_pool_equals_reduce_window():
    x = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
    ref = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    np.testing.assert_array_equal(max_pool_2x2(x), ref)
    with pytest.raises(ValueError, match="even"):
        max_pool_2x2(jnp.ones((1, 3, 4, 1)))


def test_max_pool_gradient_goes_to_the_first_maximum_as_torch():
    """Ties are common (a dropped kernel's windows are all zeros): the whole gradient of a
    window goes to its first maximum in row-major order, as torch's max_pool2d (the oracle)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, (2, 6, 8, 3)).astype(np.float32)  # values 0..2: ties in most windows
    x[0, :, :, 1] = 0.0  # a whole channel of zeros: every window tied four ways
    x[1, 2:4, 2:4, 0] = [[1.0, 2.0], [2.0, 2.0]]  # three-way tie after a smaller first entry
    w = rng.normal(size=(2, 3, 4, 3)).astype(np.float32)
    got = jax.jit(jax.grad(lambda a: (max_pool_2x2(a) * w).sum()))(jnp.asarray(x))
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    (torch.nn.functional.max_pool2d(xt, 2) * torch.tensor(w.transpose(0, 3, 1, 2))).sum().backward()
    np.testing.assert_array_equal(np.asarray(got), xt.grad.numpy().transpose(0, 2, 3, 1))
    # by hand for the two special windows: all of the gradient on the first entry
    assert got[0, 0, 0, 1] == w[0, 0, 0, 1] and (got[0, :2, :2, 1].sum() == got[0, 0, 0, 1])
    np.testing.assert_array_equal(got[1, 2:4, 2:4, 0], [[0.0, w[1, 1, 1, 0]], [0.0, 0.0]])
    # and it is vmap-safe (modules are vmapped)
    vg = jax.vmap(jax.grad(lambda a, v: (max_pool_2x2(a) * v).sum()))(jnp.stack([x, x]), jnp.stack([w, w]))
    np.testing.assert_array_equal(vg[1], got)
