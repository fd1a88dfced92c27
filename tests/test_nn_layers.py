"""Shared equivariant layers of equiformer.nn: equivariance under O(3) in float64, layer-norm
properties, segment softmax against a dense reference, smooth radial cutoff."""

from __future__ import annotations

import math

import pytest
import torch
from e3nn import o3

from equiformer.nn import (
    AtomEmbedding,
    BesselRadialBasis,
    DepthwiseTensorProduct,
    EdgeDegreeEmbedding,
    EquivariantFeedForward,
    EquivariantGraphAttention,
    EquivariantLayerNorm,
    EquivariantLinear,
    GaussianRadialBasis,
    Gate,
    PolynomialEnvelope,
    RadialMLP,
    RadialTensorProduct,
    SmoothLeakyReLU,
    segment_max,
    segment_mean,
    segment_softmax,
    segment_sum,
)
from equiformer.o3 import canonical_irreps, heads_irreps, irreps_to_gate, spherical_harmonics_irreps

F64 = torch.float64
# E(3) irreps with every parity, and the SE(3) (all-even) irreps of the paper
IRREPS_E3 = o3.Irreps("6x0e+2x0o+3x1e+2x1o+2x2e+1x2o")
IRREPS_SE3 = o3.Irreps("6x0e+3x1e+2x2e")
SH_E3 = spherical_harmonics_irreps(2, parity=True)
SH_SE3 = spherical_harmonics_irreps(2, parity=False)


@pytest.fixture(autouse=True)
def _float64_one_thread():
    """Build layers and Wigner matrices in float64 (e3nn derives them in the default dtype); tiny
    tensors run fastest on one thread (and do not oversubscribe a shared machine)."""
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(F64)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)
    torch.set_num_threads(threads)


def group_elements(parity: bool) -> list[torch.Tensor]:
    """Two rotations, plus two improper elements (rotation x inversion) for E(3)."""
    gen = torch.Generator().manual_seed(1)
    mats = [o3.angles_to_matrix(*(torch.rand(3, generator=gen, dtype=F64) * 2 * math.pi)) for _ in range(2)]
    if parity:
        mats += [-m for m in mats]
    return mats


def random_graph(n: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [n,3] (Å) and all ordered pairs as edges [2, n(n-1)] (row 0 = source)."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randn(n, 3, generator=gen, dtype=F64) * 1.5
    src, dst = zip(*[(j, i) for i in range(n) for j in range(n) if i != j])
    return pos, torch.tensor([src, dst])


def edge_features(pos: torch.Tensor, edge_index: torch.Tensor, irreps_sh: o3.Irreps, num_basis: int = 6):
    vec = pos[edge_index[0]] - pos[edge_index[1]]
    sh = o3.spherical_harmonics(irreps_sh, vec, normalize=True, normalization="component")
    rbf = BesselRadialBasis(num_basis, cutoff=6.0)  # deterministic: equal features for equal lengths
    return sh, rbf(vec.norm(dim=-1)), PolynomialEnvelope(6.0)(vec.norm(dim=-1))


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------- scatter


def test_segment_reductions_match_dense_loops():
    gen = torch.Generator().manual_seed(3)
    index = torch.tensor([0, 2, 2, 0, 4, 2, 0])  # segments 1 and 3 are empty
    src = torch.randn(7, 3, generator=gen, dtype=F64)
    s, mean, mx = segment_sum(src, index, 5), segment_mean(src, index, 5), segment_max(src, index, 5)
    for seg in range(5):
        rows = src[index == seg]
        if len(rows) == 0:
            assert torch.all(s[seg] == 0) and torch.all(mean[seg] == 0) and torch.all(mx[seg] == 0)
        else:
            torch.testing.assert_close(s[seg], rows.sum(0))
            torch.testing.assert_close(mean[seg], rows.mean(0))
            torch.testing.assert_close(mx[seg], rows.max(0).values)


@pytest.mark.parametrize("heads", [None, 3])
def test_segment_softmax_matches_dense_softmax(heads):
    gen = torch.Generator().manual_seed(4)
    index = torch.tensor([1, 0, 1, 3, 1, 0, 3, 3, 3])
    shape = (9,) if heads is None else (9, heads)
    logits = torch.randn(shape, generator=gen, dtype=F64) * 30  # large logits: needs the max shift
    weights = torch.rand(9, generator=gen, dtype=F64)
    out = segment_softmax(logits, index, 5)
    masked = segment_softmax(logits, index, 5, weights=weights)
    for seg in (0, 1, 3):
        sel = index == seg
        torch.testing.assert_close(out[sel], torch.softmax(logits[sel], dim=0))
        w = weights[sel].view(-1, *([1] * (logits.dim() - 1)))
        ref = w * torch.exp(logits[sel] - logits[sel].max(0).values)
        torch.testing.assert_close(masked[sel], ref / ref.sum(0))
    assert torch.isfinite(out).all()


def test_segment_softmax_soft_mask_removes_an_entry_continuously():
    logits = torch.tensor([0.3, -1.2, 2.0], dtype=F64)
    index = torch.zeros(3, dtype=torch.long)
    dropped = torch.softmax(logits[:2], 0)
    for w in (1e-3, 1e-6, 1e-9):
        out = segment_softmax(logits, index, 1, weights=torch.tensor([1.0, 1.0, w], dtype=F64))
        assert float((out[:2] - dropped).abs().max()) < 10 * w
        assert float(out[2]) < 10 * w


# ----------------------------------------------------------------------------------------- radial


def test_polynomial_envelope_is_smooth_at_cutoff():
    env = PolynomialEnvelope(cutoff=5.0, exponent=5)
    r = torch.tensor([0.0, 2.5, 5.0 - 1e-6, 5.0, 5.0 + 1e-6, 7.0], dtype=F64, requires_grad=True)
    u = env(r)
    (du,) = torch.autograd.grad(u.sum(), r, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), r)
    u, du, d2u = u.detach(), du.detach(), d2u.detach()
    assert float(u[0]) == pytest.approx(1.0)
    assert 0.0 < float(u[1]) < 1.0
    # 1e-6 below the cutoff: value, slope and curvature ~0 (u ~ 35 (1-x)^3)
    assert 0.0 < float(u[2]) < 1e-17 and abs(float(du[2])) < 1e-11 and abs(float(d2u[2])) < 1e-5
    assert float(u[3]) == float(u[4]) == float(u[5]) == 0.0 and float(du[3]) == 0.0
    # while well inside, the slope is of order 1/cutoff
    assert float(du[1]) < -0.1
    # the DimeNet polynomial, monotone decreasing in between
    grid = torch.linspace(0, 5, 200, dtype=F64)
    x = grid / 5.0
    expanded = 1 - 21 * x**5 + 35 * x**6 - 15 * x**7
    torch.testing.assert_close(env(grid), expanded, rtol=0, atol=1e-14)
    assert torch.all(env(grid)[1:] <= env(grid)[:-1])


def test_radial_bases_shapes_and_values():
    r = torch.linspace(0.5, 4.9, 11, dtype=F64)
    bessel = BesselRadialBasis(8, cutoff=5.0)(r)
    n = torch.arange(1, 9, dtype=F64)
    expected = math.sqrt(2 / 5.0) * torch.sin(n * math.pi * r[:, None] / 5.0) / r[:, None]
    torch.testing.assert_close(bessel, expected)
    gauss = GaussianRadialBasis(16, cutoff=5.0)
    g = gauss(r)
    assert g.shape == (11, 16) and torch.all(g > 0)
    assert {n for n, _ in gauss.named_parameters()} == {"mean", "std", "scale", "offset"}
    mlp = RadialMLP([16, 8, 8, 5])
    assert mlp(g).shape == (11, 5)


# ------------------------------------------------------------------------------------------ irreps


def test_irreps_helpers():
    assert canonical_irreps("2x1o+3x0e+1x0o+2x0e") == o3.Irreps("5x0e+1x0o+2x1o")
    scalars, gates, gated = irreps_to_gate("4x0e+2x0o+3x1e")
    assert (scalars, gates, gated) == (o3.Irreps("4x0e"), o3.Irreps("5x0e"), o3.Irreps("2x0o+3x1e"))
    assert heads_irreps("4x0e+1x1e", 3) == o3.Irreps("12x0e+3x1e")
    assert spherical_harmonics_irreps(2, True) == o3.Irreps("1x0e+1x1o+1x2e")
    assert spherical_harmonics_irreps(2, False) == o3.Irreps("1x0e+1x1e+1x2e")
    with pytest.raises(ValueError, match="not canonical"):
        EquivariantLinear("1x1e+2x0e", "2x0e")


# ------------------------------------------------------------------------------ node-wise layers


@pytest.mark.parametrize("irreps", [IRREPS_E3, IRREPS_SE3], ids=["E3", "SE3"])
def test_linear_gate_norm_ffn_are_equivariant(irreps):
    parity = irreps == IRREPS_E3
    x = irreps.randn(10, -1)
    out_irreps = o3.Irreps("4x0e+1x0o+2x1e+2x2e+1x3o")  # 3o and (for SE3) 0o/1o absent from input
    layers = {
        "linear": (EquivariantLinear(irreps, out_irreps), out_irreps),
        "gate": (Gate(irreps), irreps),
        "norm": (EquivariantLayerNorm(irreps), irreps),
        "ffn": (EquivariantFeedForward(irreps, "8x0e+2x0o+4x1e+2x1o+2x2e+1x2o", irreps), irreps),
    }
    gate = layers["gate"][0]
    x_gate = gate.irreps_in.randn(10, -1)
    for name, (layer, irreps_out) in layers.items():
        inp_irreps = gate.irreps_in if name == "gate" else irreps
        inp = x_gate if name == "gate" else x
        with torch.no_grad():  # perturb the norm's affine parameters away from the identity
            for p in layer.parameters():
                p.add_(0.1 * torch.randn_like(p))
        for R in group_elements(parity):
            rotated = layer(inp @ inp_irreps.D_from_matrix(R).T)
            expected = layer(inp) @ o3.Irreps(irreps_out).D_from_matrix(R).T
            assert max_rel(rotated, expected) < 1e-12, (name, R)


def test_linear_zero_blocks_bias_and_init_scale():
    lin = EquivariantLinear("64x0e+32x1e", "16x0e+8x1e+4x1o")
    x = o3.Irreps("64x0e+32x1e").randn(2000, -1)
    y = lin(x).detach()
    assert torch.all(y[:, 40:] == 0)  # 1o is not in the input
    with torch.no_grad():
        lin.bias.fill_(2.0)
    assert torch.allclose(lin(torch.zeros(1, x.shape[1]))[0, :16], torch.full((16,), 2.0, dtype=F64))
    # torch.nn.Linear-like init: unit-variance inputs give ~unit-variance outputs
    assert 0.7 < float(y[:, :16].var()) < 1.3 and 0.7 < float(y[:, 16:40].var()) < 1.3


def test_gate_matches_formula():
    gate = Gate("2x0e+1x0o+1x1e")
    assert gate.irreps_in == o3.Irreps("4x0e+1x0o+1x1e")
    x = gate.irreps_in.randn(5, -1)
    out = gate(x)
    torch.testing.assert_close(out[:, :2], torch.nn.functional.silu(x[:, :2]))
    torch.testing.assert_close(out[:, 2:3], x[:, 4:5] * torch.sigmoid(x[:, 2:3]))
    torch.testing.assert_close(out[:, 3:6], x[:, 5:8] * torch.sigmoid(x[:, 3:4]))


def test_smooth_leaky_relu_limits():
    act = SmoothLeakyReLU(0.2)
    x = torch.tensor([-50.0, 0.0, 50.0], dtype=F64)
    torch.testing.assert_close(act(x), torch.tensor([-10.0, 0.0, 50.0], dtype=F64))


def test_layer_norm_properties():
    irreps = o3.Irreps("16x0e+8x1o+4x2e")
    x = irreps.randn(50, -1) * 3.0 + 0.7
    norm = EquivariantLayerNorm(irreps, eps=0.0)
    y = norm(x)
    s, v, t = y[:, :16], y[:, 16:40], y[:, 40:]
    torch.testing.assert_close(s.mean(-1), torch.zeros(50, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(s.pow(2).mean(-1), torch.ones(50, dtype=F64))
    torch.testing.assert_close(v.pow(2).mean(-1), torch.ones(50, dtype=F64))
    torch.testing.assert_close(t.pow(2).mean(-1), torch.ones(50, dtype=F64))
    # invariant to a global rescaling of each input block
    torch.testing.assert_close(norm(x * 5.0), y)
    # scalars alone: torch's LayerNorm
    ln = EquivariantLayerNorm("16x0e", eps=1e-5)
    torch.testing.assert_close(ln(x[:, :16]), torch.nn.functional.layer_norm(x[:, :16], (16,), eps=1e-5))
    # vectors are not centred (centring would break equivariance)
    vec_only = EquivariantLayerNorm("8x1o", eps=0.0)(x[:, 16:40])
    torch.testing.assert_close(vec_only, x[:, 16:40] / x[:, 16:40].pow(2).mean(-1, keepdim=True).sqrt())


# ------------------------------------------------------------------------------ edge-wise layers


@pytest.mark.parametrize("shared", [False, True])
def test_depthwise_tensor_product_equivariance_and_paths(shared):
    dtp = DepthwiseTensorProduct(IRREPS_E3, SH_E3, IRREPS_E3, shared_weights=shared)
    # outputs are canonical and only of types in the filter (plus 0e)
    assert dtp.irreps_out == canonical_irreps(dtp.irreps_out)
    assert {ir for _, ir in dtp.irreps_out} <= {ir for _, ir in IRREPS_E3}
    pos, edge_index = random_graph()
    sh, _, _ = edge_features(pos, edge_index, SH_E3)
    x = IRREPS_E3.randn(edge_index.shape[1], -1)
    w = None if shared else torch.randn(edge_index.shape[1], dtp.weight_numel)
    for R in group_elements(True):
        sh_rot = o3.spherical_harmonics(SH_E3, (pos[edge_index[0]] - pos[edge_index[1]]) @ R.T, True, "component")
        rotated = dtp(x @ IRREPS_E3.D_from_matrix(R).T, sh_rot, w)
        expected = dtp(x, sh, w) @ dtp.irreps_out.D_from_matrix(R).T
        assert max_rel(rotated, expected) < 1e-12


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize(
    "irreps,irreps_sh",
    [(IRREPS_E3, SH_E3), (IRREPS_SE3, SH_SE3), (o3.Irreps("4x0e+2x1o+2x2e+1x3o"), spherical_harmonics_irreps(3, True))],
    ids=["E3", "SE3", "lmax3"],
)
def test_fused_tensor_product_matches_e3nn_reference(irreps, irreps_sh, shared):
    """The default fused kernels equal e3nn's TensorProduct: outputs and all gradients, same state dict."""
    fused = DepthwiseTensorProduct(irreps, irreps_sh, irreps, shared_weights=shared, backend="fused")
    reference = DepthwiseTensorProduct(irreps, irreps_sh, irreps, shared_weights=shared, backend="e3nn")
    assert set(fused.state_dict()) == set(reference.state_dict())
    reference.load_state_dict(fused.state_dict())
    assert fused.irreps_out == reference.irreps_out and fused.weight_numel == reference.weight_numel
    x = irreps.randn(9, -1, requires_grad=True)
    sh = irreps_sh.randn(9, -1, requires_grad=True)
    w = fused.weight if shared else torch.randn(9, fused.weight_numel, requires_grad=True)
    out_f = fused(x, sh, None if shared else w)
    out_r = reference(x, sh, None if shared else w)
    torch.testing.assert_close(out_f, out_r, rtol=0, atol=1e-13)
    cotangent = torch.randn_like(out_f)
    w_ref = reference.weight if shared else w
    grads_f = torch.autograd.grad((out_f * cotangent).sum(), [x, sh, w])
    grads_r = torch.autograd.grad((out_r * cotangent).sum(), [x, sh, w_ref])
    for g_f, g_r in zip(grads_f, grads_r):
        torch.testing.assert_close(g_f, g_r, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["fused", "e3nn"])
def test_double_cast_restores_exact_clebsch_gordan(backend):
    """A layer built in float32 then cast to float64 must be equivariant to float64 precision."""
    torch.set_default_dtype(torch.float32)
    dtp = RadialTensorProduct("4x0e+2x1o+2x2e", SH_E3, "4x0e+2x1o+2x2e", [6, 8], backend=backend)
    torch.set_default_dtype(F64)
    dtp = dtp.double()
    pos, edge_index = random_graph()
    sh, rbf, _ = edge_features(pos, edge_index, SH_E3)
    irreps = o3.Irreps("4x0e+2x1o+2x2e")
    x = irreps.randn(edge_index.shape[1], -1)
    R = group_elements(True)[-1]
    sh_rot = o3.spherical_harmonics(SH_E3, (pos[edge_index[0]] - pos[edge_index[1]]) @ R.T, True, "component")
    rotated = dtp(x @ irreps.D_from_matrix(R).T, sh_rot, rbf)
    assert max_rel(rotated, dtp(x, sh, rbf) @ dtp.irreps_out.D_from_matrix(R).T) < 1e-12


ATTENTION_CASES = [
    ("mlp", True, True),
    ("mlp", False, True),
    ("dot_product", False, True),
    ("dot_product", True, True),
    ("mlp", True, False),
    ("dot_product", False, False),
]


@pytest.mark.parametrize("attention,nonlinear,parity", ATTENTION_CASES)
def test_graph_attention_equivariance(attention, nonlinear, parity):
    irreps, sh_irreps = (IRREPS_E3, SH_E3) if parity else (IRREPS_SE3, SH_SE3)
    head = "2x0e+1x0o+1x1e+1x1o+1x2e" if parity else "2x0e+1x1e+1x2e"
    layer = EquivariantGraphAttention(
        irreps, sh_irreps, head, num_heads=3, radial_channels=[6, 8], attention=attention, nonlinear_message=nonlinear
    )
    pos, edge_index = random_graph()
    x = irreps.randn(pos.shape[0], -1)

    def run(x, pos):
        sh, rbf, env = edge_features(pos, edge_index, sh_irreps)
        return layer(x, edge_index, sh, rbf, env)

    ref = run(x, pos)
    assert ref.shape == (pos.shape[0], irreps.dim)
    for R in group_elements(parity):
        D = irreps.D_from_matrix(R)
        rotated = run(x @ D.T, pos @ R.T + torch.tensor([0.3, -2.0, 1.0], dtype=F64))
        assert max_rel(rotated, ref @ D.T) < 1e-11
    # permuting the nodes (and relabelling the edges) permutes the output
    perm = torch.randperm(pos.shape[0])
    inv = torch.argsort(perm)
    sh, rbf, env = edge_features(pos, edge_index, sh_irreps)
    permuted = layer(x[perm], inv[edge_index], sh, rbf, env)
    assert max_rel(permuted, ref[perm]) < 1e-12


def test_graph_attention_weights_are_a_softmax_over_incoming_edges():
    """With identical values on every edge, attention (weights summing to 1) returns proj(value)."""
    layer = EquivariantGraphAttention("4x0e", "1x0e", "2x0e", 2, [3, 4], nonlinear_message=False)
    pos, edge_index = random_graph(5)
    torch.nn.init.zeros_(layer.value_lin.weights[0])
    with torch.no_grad():
        layer.value_lin.bias.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    x = torch.randn(5, 4)
    out = layer(x, edge_index, torch.ones(edge_index.shape[1], 1), torch.randn(edge_index.shape[1], 3))
    expected = layer.proj(torch.tensor([[1.0, -2.0, 0.5, 3.0]]).expand(5, 4))
    torch.testing.assert_close(out, expected)


def test_embeddings():
    irreps = o3.Irreps("8x0e+2x1o+1x2e")
    emb = AtomEmbedding(irreps, num_atom_types=10)
    h = emb(torch.tensor([1, 6, 6, 8]))
    assert h.shape == (4, irreps.dim) and torch.all(h[:, 8:] == 0)
    torch.testing.assert_close(h[1], h[2])
    with pytest.raises(ValueError, match="atomic numbers"):
        emb(torch.tensor([1, 12]))

    deg = EdgeDegreeEmbedding(irreps, SH_E3, [6, 8], avg_degree=4.0)
    pos, edge_index = random_graph()
    sh, rbf, env = edge_features(pos, edge_index, SH_E3)
    ref = deg(edge_index, sh, rbf, pos.shape[0], env)
    assert ref[:, 8:].abs().max() > 0  # seeds the l > 0 channels with geometry
    for R in group_elements(True):
        sh_r, rbf_r, env_r = edge_features(pos @ R.T, edge_index, SH_E3)
        rotated = deg(edge_index, sh_r, rbf_r, pos.shape[0], env_r)
        assert max_rel(rotated, ref @ irreps.D_from_matrix(R).T) < 1e-12
