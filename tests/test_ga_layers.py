"""GATr layers, attention, net and point encoder: E(3) equivariance in float64 and behaviour."""

from __future__ import annotations

import json
import math

import pytest
import torch

from equiformer.ga import (
    AxialGATr,
    EquiLayerNorm,
    EquiLinear,
    GATr,
    GATrBlock,
    GATrPointEncoder,
    GeometricBilinear,
    GradeDropout,
    ScalarGatedGELU,
    SelfAttention,
    embed_point,
    extract_point,
    geometric_attention,
    inner_product,
    random_e3,
    sandwich,
)
from equiformer.ga.algebra import GRADES
from equiformer.ga.layers import equi_linear_basis
from equiformer.ga.transforms import KINDS

DT = torch.float64
TOL = dict(rtol=0, atol=1e-10)
torch.set_num_threads(1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_inputs(g, lead=(2, 5), c=3, s=4, scale=1.0):
    mv = torch.randn(*lead, c, 16, dtype=DT, generator=g) * scale
    sc = torch.randn(*lead, s, dtype=DT, generator=g)
    return mv, sc


def versor_for(kind, g, batch=2):
    """A versor per batch element, shaped [B, 1, 1, 16] to act on mv [B, N, C, 16]."""
    u, _, _ = random_e3(kind, (batch,), generator=g)
    return u[:, None, None, :]


def rep_matrix(u: torch.Tensor) -> torch.Tensor:
    """The 16x16 matrix R with sandwich(u, x) = x @ R."""
    return sandwich(u.expand(16, 16), torch.eye(16, dtype=DT))


# --- equivariant linear maps -------------------------------------------------------------


def test_nine_basis_maps_span_the_equivariant_linear_maps():
    """Solve M R_g = R_g M for random rotations, translations and reflections: the solution
    space is 9-dimensional and spanned by our basis (5 grade projections, 4 e0 maps)."""
    g = gen(0)
    eye = torch.eye(16, dtype=DT)
    rows = []
    for kind in KINDS:
        for _ in range(2):
            u, _, _ = random_e3(kind, (), generator=g)
            r = rep_matrix(u)
            # vec(M R - R M) = (R^T kron I - I kron R) vec(M)  (row-major vec)
            rows.append(torch.kron(eye, r.T.contiguous()) - torch.kron(r, eye))
    system = torch.cat(rows)
    sv = torch.linalg.svdvals(system)
    null_dim = int((sv < 1e-9 * sv.max()).sum())
    assert null_dim == 9
    basis = equi_linear_basis(dtype=DT)
    flat = basis.reshape(9, 256)
    assert torch.linalg.matrix_rank(flat) == 9
    torch.testing.assert_close(system @ flat.T, torch.zeros(system.shape[0], 9, dtype=DT), **TOL)


def test_equilinear_matches_basis_sum_and_is_equivariant():
    g = gen(1)
    lin = EquiLinear(3, 5, 4, 6).double()
    with torch.no_grad():
        for p in lin.parameters():
            p.normal_(generator=g)
    mv, s = rand_inputs(g)
    out_mv, out_s = lin(mv, s)
    assert out_mv.shape == (2, 5, 5, 16) and out_s.shape == (2, 5, 6)
    # reference: explicit sum over basis maps, scalar couplings and biases
    basis = equi_linear_basis(dtype=DT)
    ref = torch.einsum("oib,...ix,bxy->...oy", lin.weight, mv, basis)
    ref[..., 0] += s @ lin.s2mv.T + lin.bias_mv
    torch.testing.assert_close(out_mv, ref, **TOL)
    torch.testing.assert_close(out_s, mv[..., 0] @ lin.mv2s.T + s @ lin.s2s.T + lin.bias_s, **TOL)
    for kind in KINDS:
        u = versor_for(kind, g)
        mv2, s2 = lin(sandwich(u, mv), s)
        torch.testing.assert_close(mv2, sandwich(u, out_mv), **TOL)
        torch.testing.assert_close(s2, out_s, **TOL)
    with pytest.raises(ValueError, match="EquiLinear expects multivectors"):
        lin(mv[..., :2, :], s)


def _equilinear_unfused(lin: EquiLinear, mv: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EquiLinear written term by term (basis sum, scalar couplings, biases), the pre-fusion code."""
    basis = equi_linear_basis(dtype=mv.dtype)
    out = torch.einsum("oib,...ix,bxy->...oy", lin.weight, mv, basis)
    extra = torch.zeros(*mv.shape[:-2], lin.out_mv, dtype=mv.dtype)
    if lin.s2mv is not None:
        extra = extra + s @ lin.s2mv.T
    if lin.bias_mv is not None:
        extra = extra + lin.bias_mv
    out = out + torch.nn.functional.pad(extra.unsqueeze(-1), (0, 15))
    s_out = torch.zeros(*mv.shape[:-2], lin.out_s, dtype=mv.dtype)
    if lin.mv2s is not None:
        s_out = s_out + mv[..., 0] @ lin.mv2s.T
    if lin.s2s is not None:
        s_out = s_out + s @ lin.s2s.T
    if lin.bias_s is not None:
        s_out = s_out + lin.bias_s
    return out, s_out


@pytest.mark.parametrize("in_s,out_s,bias", [(4, 6, True), (0, 6, True), (4, 0, True), (0, 0, True), (4, 6, False), (0, 3, False)])
def test_fused_equilinear_equals_term_by_term_values_and_gradients(in_s, out_s, bias):
    """The single fused GEMM (one scattered weight matrix) computes exactly the unfused sum,
    and gives the same gradients for every parameter and both inputs."""
    g = gen(11)
    lin = EquiLinear(3, 5, in_s, out_s, bias=bias).double()
    with torch.no_grad():
        for p in lin.parameters():
            p.normal_(generator=g)
    mv, s = rand_inputs(g, s=in_s)
    mv.requires_grad_(True)
    s.requires_grad_(True)
    got = lin(mv, s)
    ref = _equilinear_unfused(lin, mv, s)
    assert got[0].shape == ref[0].shape and got[1].shape == ref[1].shape
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL)
    w_mv = torch.randn(ref[0].shape, dtype=DT, generator=g)
    w_s = torch.randn(ref[1].shape, dtype=DT, generator=g)
    inputs = [mv, s, *lin.parameters()] if in_s else [mv, *lin.parameters()]
    g_got = torch.autograd.grad((got[0] * w_mv).sum() + (got[1] * w_s).sum(), inputs)
    g_ref = torch.autograd.grad((ref[0] * w_mv).sum() + (ref[1] * w_s).sum(), inputs)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, **TOL)
    # the dense multivector kernel is the basis sum; the layout buffers stay out of checkpoints
    kernel = torch.einsum("oib,bxy->ixoy", lin.weight, equi_linear_basis(dtype=DT)).reshape(48, 80)
    torch.testing.assert_close(lin.dense_kernel(), kernel, **TOL)
    assert set(lin.state_dict()) == {n for n, _ in lin.named_parameters()}


def test_equilinear_without_scalars_and_init_scale():
    g = gen(2)
    torch.manual_seed(2)
    lin = EquiLinear(64, 64).double()
    mv = torch.randn(256, 64, 16, dtype=DT, generator=g)
    out, s = lin(mv)
    assert s.shape == (256, 0)
    assert 0.5 < out.std().item() < 2.0  # roughly variance-preserving initialisation


# --- bilinear, norm, gate, dropout -------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_geometric_bilinear_equivariant_with_reference(kind):
    g = gen(3)
    torch.manual_seed(3)
    layer = GeometricBilinear(3, 4, 4, 2, hidden_mv=6).double()
    mv, s = rand_inputs(g)
    ref = torch.randn(2, 1, 16, dtype=DT, generator=g)  # [B, N(bcast), 16]
    out_mv, out_s = layer(mv, s, reference=ref)
    u = versor_for(kind, g)
    mv2, s2 = layer(sandwich(u, mv), s, reference=sandwich(u[:, 0], ref))
    torch.testing.assert_close(mv2, sandwich(u, out_mv), **TOL)
    torch.testing.assert_close(s2, out_s, **TOL)


def test_join_without_reference_breaks_only_reflections():
    """Shows the test above can fail: the plain join is not reflection-equivariant."""
    g = gen(4)
    torch.manual_seed(4)
    layer = GeometricBilinear(3, 4, 4, 2).double()
    mv, s = rand_inputs(g)
    out_mv, _ = layer(mv, s)
    for kind, ok in (("se3", True), ("e3_odd", False)):
        u = versor_for(kind, g)
        err = (layer(sandwich(u, mv), s)[0] - sandwich(u, out_mv)).abs().max().item()
        assert (err < 1e-10) == ok, (kind, err)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_norm_and_gated_gelu_equivariant(kind):
    g = gen(5)
    mv, s = rand_inputs(g, scale=3.0)
    u = versor_for(kind, g)
    for layer in (EquiLayerNorm(), ScalarGatedGELU()):
        out_mv, out_s = layer(mv, s)
        mv2, s2 = layer(sandwich(u, mv), s)
        torch.testing.assert_close(mv2, sandwich(u, out_mv), **TOL)
        torch.testing.assert_close(s2, out_s, **TOL)
    n_mv, n_s = EquiLayerNorm(eps=0.0)(mv, s)
    torch.testing.assert_close(inner_product(n_mv, n_mv).mean(-1), torch.ones(2, 5, dtype=DT), **TOL)
    torch.testing.assert_close(n_s.mean(-1), torch.zeros(2, 5, dtype=DT), **TOL)
    g_mv, _ = ScalarGatedGELU()(mv, s)
    gate = torch.nn.functional.gelu(mv[..., :1], approximate="tanh")
    torch.testing.assert_close(g_mv, mv * gate, **TOL)


def test_grade_dropout_drops_whole_grades_and_is_equivariant():
    g = gen(6)
    mv, s = rand_inputs(g, lead=(4, 6), c=8)
    drop = GradeDropout(0.5).train()
    torch.manual_seed(0)
    out, _ = drop(mv, s)
    grades = torch.as_tensor(GRADES.tolist())
    ratio = out / mv
    for k in range(5):
        r = ratio[..., grades == k]
        assert torch.all((r == 0) | (r - 2.0).abs().lt(1e-12))
        assert torch.all(r.amax(-1) == r.amin(-1))  # one decision per grade and channel
    assert 0.3 < (ratio[..., 0] == 0).double().mean().item() < 0.7
    u = versor_for("e3_odd", g, batch=4)
    torch.manual_seed(0)
    out2, _ = drop(sandwich(u, mv), s)
    torch.testing.assert_close(out2, sandwich(u, out), **TOL)
    drop.eval()
    assert torch.equal(drop(mv, s)[0], mv)


# --- attention ---------------------------------------------------------------------------


def explicit_attention(q_mv, k_mv, v_mv, q_s, k_s, v_s, mask, distance):
    """Reference: logits from inner_product and explicit point distances, softmax, weighted sum."""
    logits = inner_product(q_mv[..., :, None, :, :], k_mv[..., None, :, :, :]).sum(-1)
    logits = logits + (q_s[..., :, None, :] * k_s[..., None, :, :]).sum(-1)
    dim = 8 * q_mv.shape[-2] + q_s.shape[-1]
    if distance:
        qw, kw = q_mv[..., 14], k_mv[..., 14]  # [B, H, N, C]
        qo, ko = q_mv[..., 11:14], k_mv[..., 11:14]
        diff = qw[..., :, None, :, None] * ko[..., None, :, :, :] - kw[..., None, :, :, None] * qo[..., :, None, :, :]
        logits = logits - (diff**2).sum((-1, -2))
        dim += 5 * q_mv.shape[-2]
    logits = logits / math.sqrt(dim)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    w = logits.softmax(-1)
    return torch.einsum("...nm,...mcx->...ncx", w, v_mv), torch.einsum("...nm,...ms->...ns", w, v_s)


@pytest.mark.parametrize("distance", [True, False])
def test_sdpa_attention_matches_explicit_formula(distance):
    g = gen(7)
    shape = (2, 3, 6)  # B, H, N
    q_mv, k_mv, v_mv = (torch.randn(*shape, 2, 16, dtype=DT, generator=g) for _ in range(3))
    q_s, k_s, v_s = (torch.randn(*shape, 3, dtype=DT, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., 4:] = False
    got = geometric_attention(q_mv, k_mv, v_mv, q_s, k_s, v_s, mask=mask, distance=distance)
    want = explicit_attention(q_mv, k_mv, v_mv, q_s, k_s, v_s, mask, distance)
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)


def test_distance_term_is_minus_squared_distance_for_points():
    from equiformer.ga.attention import attention_features

    g = gen(8)
    a, b = torch.randn(2, 5, 3, dtype=DT, generator=g) * 4
    empty = torch.zeros(5, 0, dtype=DT)
    qa = attention_features(embed_point(a)[:, None], empty, "query")
    kb = attention_features(embed_point(b)[:, None], empty, "key")
    ip = (qa[:, :8] * kb[:, :8]).sum(-1)
    torch.testing.assert_close(ip, torch.ones(5, dtype=DT), **TOL)  # e123 . e123
    dist = (qa[:, 8:] * kb[:, 8:]).sum(-1)
    torch.testing.assert_close(dist, -((a - b) ** 2).sum(-1), **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_self_attention_equivariant_and_mask(kind):
    g = gen(9)
    torch.manual_seed(9)
    attn = SelfAttention(3, 4, num_heads=2, head_mv=2, head_s=3).double()
    mv, s = rand_inputs(g, lead=(2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    out_mv, out_s = attn(mv, s, mask=mask)
    u = versor_for(kind, g)
    mv2, s2 = attn(sandwich(u, mv), s, mask=mask)
    torch.testing.assert_close(mv2, sandwich(u, out_mv), **TOL)
    torch.testing.assert_close(s2, out_s, **TOL)
    # padded items do not influence real ones
    mv3, s3 = mv.clone(), s.clone()
    mv3[0, 4:] = 100.0
    s3[0, 4:] = -7.0
    mv4, s4 = attn(mv3, s3, mask=mask)
    torch.testing.assert_close(mv4[0, :4], out_mv[0, :4], **TOL)
    torch.testing.assert_close(s4[0, :4], out_s[0, :4], **TOL)


# --- blocks and nets -----------------------------------------------------------------------


def small_gatr(**kw):
    torch.manual_seed(10)
    args = dict(in_mv_channels=2, out_mv_channels=3, hidden_mv_channels=6, in_s_channels=3, out_s_channels=2,
                hidden_s_channels=8, num_blocks=2, num_heads=2)
    args.update(kw)
    return GATr(**args).double()


@pytest.mark.parametrize("kind", KINDS)
def test_block_and_gatr_equivariant(kind):
    g = gen(11)
    mv, s = rand_inputs(g, lead=(2, 5), c=2, s=3, scale=2.0)
    u = versor_for(kind, g)
    torch.manual_seed(11)
    block = GATrBlock(2, 3, num_heads=2, head_mv=2, head_s=2).double()
    ref = mv.mean((-2, -3))[:, None]  # [B, 1, 16]
    o_mv, o_s = block(mv, s, reference=ref)
    b_mv, b_s = block(sandwich(u, mv), s, reference=sandwich(u[:, 0], ref))
    torch.testing.assert_close(b_mv, sandwich(u, o_mv), **TOL)
    torch.testing.assert_close(b_s, o_s, **TOL)

    net = small_gatr()
    out_mv, out_s = net(mv, s)
    mv2, s2 = net(sandwich(u, mv), s)
    torch.testing.assert_close(mv2, sandwich(u, out_mv), **TOL)
    torch.testing.assert_close(s2, out_s, **TOL)


def test_gatr_float32_equivariance_and_permutation():
    g = gen(12)
    net = small_gatr().float()
    mv, s = rand_inputs(g, lead=(2, 7), c=2, s=3)
    mv, s = mv.float(), s.float()
    u = versor_for("e3_odd", g).float()
    out_mv, out_s = net(mv, s)
    mv2, s2 = net(sandwich(u, mv), s)
    torch.testing.assert_close(mv2, sandwich(u, out_mv), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s2, out_s, rtol=1e-4, atol=1e-4)
    perm = torch.randperm(7, generator=g)
    mv3, s3 = net(mv[:, perm], s[:, perm])
    torch.testing.assert_close(mv3, out_mv[:, perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s3, out_s[:, perm], rtol=1e-5, atol=1e-5)


def test_gatr_variable_size_sets_padding_and_pyg_batch():
    g = gen(13)
    net = small_gatr()
    sizes = [3, 6, 1]
    sets = [rand_inputs(g, lead=(n,), c=2, s=3) for n in sizes]
    singles = [net(m[None], s[None]) for m, s in sets]
    # flat PyG-style batch vector
    mv = torch.cat([m for m, _ in sets])
    s = torch.cat([x for _, x in sets])
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    f_mv, f_s = net.forward_flat(mv, s, batch)
    torch.testing.assert_close(f_mv, torch.cat([o[0][0] for o in singles]), **TOL)
    torch.testing.assert_close(f_s, torch.cat([o[1][0] for o in singles]), **TOL)
    # padding outputs are zero, and the masked net is still equivariant
    from equiformer.ga import to_padded

    p_mv, mask = to_padded(mv, batch)
    p_s, _ = to_padded(s, batch)
    o_mv, o_s = net(p_mv, p_s, mask=mask)
    assert torch.all(o_mv[~mask] == 0) and torch.all(o_s[~mask] == 0)
    u = random_e3("e3_odd", (3,), generator=g)[0][:, None, None, :]
    o2_mv, _ = net(sandwich(u, p_mv), p_s, mask=mask)
    torch.testing.assert_close(o2_mv, sandwich(u, o_mv), **TOL)


def test_gatr_config_errors_checkpoint_and_gradients():
    net = small_gatr(dropout=0.1, checkpoint_blocks=True)
    assert json.loads(json.dumps(net.config)) == net.config
    g = gen(14)
    mv, s = rand_inputs(g, lead=(2, 4), c=2, s=3)
    with pytest.raises(ValueError, match="multivectors"):
        net(mv[..., :1, :], s)
    with pytest.raises(ValueError, match="scalars"):
        net(mv, s[..., :2])
    with pytest.raises(ValueError, match="in_s_channels=3"):
        net(mv)
    net.train()
    out_mv, out_s = net(mv, s)
    (out_mv.square().sum() + out_s.square().sum()).backward()
    grads = [p.grad for p in net.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum() > 0) for gr in grads) > 0.9 * len(grads)


@pytest.mark.parametrize("kind", ["se3", "e3_odd"])
def test_axial_gatr_equivariant(kind):
    g = gen(15)
    torch.manual_seed(15)
    net = AxialGATr(2, 2, 4, 1, 1, 4, num_blocks=2, num_heads=2).double()
    mv = torch.randn(2, 3, 4, 2, 16, dtype=DT, generator=g)
    s = torch.randn(2, 3, 4, 1, dtype=DT, generator=g)
    u = random_e3(kind, (2,), generator=g)[0][:, None, None, None, :]
    out_mv, out_s = net(mv, s)
    mv2, s2 = net(sandwich(u, mv), s)
    torch.testing.assert_close(mv2, sandwich(u, out_mv), **TOL)
    torch.testing.assert_close(s2, out_s, **TOL)
    # both item axes are mixed: changing one item changes outputs in its row and column
    mv3 = mv.clone()
    mv3[0, 0, 0] += 1.0
    diff = (net(mv3, s)[0] - out_mv).abs().sum((-1, -2))[0]
    assert diff[1, 1] > 0 and diff[2, 3] > 0


def test_gatr_learns_the_centroid():
    """A tiny GATr learns to output the centroid of a random cloud as a point: a real,
    if small, fit that needs attention (the distance/inner-product logits) to pool."""
    torch.manual_seed(0)
    net = GATr(1, 1, 8, 1, 1, 8, num_blocks=1, num_heads=2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = gen(16)

    def batch():
        p = torch.randn(16, 6, 3, generator=g)
        return embed_point(p)[:, :, None], torch.ones(16, 6, 1), p.mean(1, keepdim=True).expand(-1, 6, -1)

    def loss_fn():
        mv, s, target = batch()
        out, _ = net(mv, s)
        return (out[..., 0, 11:14] - embed_point(target)[..., 11:14]).square().mean()

    with torch.no_grad():
        start = sum(loss_fn().item() for _ in range(3)) / 3
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = sum(loss_fn().item() for _ in range(3)) / 3
    assert end < 0.02 * start, (start, end)


# --- point encoder ------------------------------------------------------------------------


def encoder(**kw):
    torch.manual_seed(17)
    args = dict(out_mv_channels=2, out_s_channels=3, hidden_mv_channels=4, hidden_s_channels=6, num_blocks=1,
                num_heads=2, in_features=2, use_normals=True)
    args.update(kw)
    return GATrPointEncoder(**args).double()


def cloud(g, b=2, n=8):
    p = torch.randn(b, n, 3, dtype=DT, generator=g) * 2
    nrm = torch.randn(b, n, 3, dtype=DT, generator=g)
    nrm = nrm / nrm.norm(dim=-1, keepdim=True)
    f = torch.randn(b, n, 2, dtype=DT, generator=g)
    return p, nrm, f


def move(kind, g, p, n, b=2):
    u, r, t = random_e3(kind, (b,), generator=g)
    p2 = torch.einsum("bij,bnj->bni", r, p) + t[:, None]
    n2 = torch.einsum("bij,bnj->bni", r, n)
    return u[:, None, None, :], p2, n2, r, t


@pytest.mark.parametrize("kind", ["rotation", "translation", "se3"])
def test_point_encoder_se3_equivariant(kind):
    g = gen(18)
    enc = encoder()
    p, n, f = cloud(g)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 6:] = False
    out_mv, out_s = enc(p, n, f, mask=mask)
    assert out_mv.shape == (2, 8, 2, 16) and out_s.shape == (2, 8, 3)
    u, p2, n2, r, t = move(kind, g, p, n)
    mv2, s2 = enc(p2, n2, f, mask=mask)
    torch.testing.assert_close(mv2, sandwich(u, out_mv), **TOL)
    torch.testing.assert_close(s2, out_s, **TOL)
    # extracted output points move with the cloud
    pts, pts2 = enc.extract_points(out_mv), enc.extract_points(mv2)
    want = torch.einsum("bij,bnj->bni", r, pts) + t[:, None]
    torch.testing.assert_close(pts2[mask], want[mask], rtol=0, atol=1e-8)
    assert torch.all(out_mv[~mask] == 0)


def test_point_encoder_reflections_oriented_and_symmetrized():
    g = gen(19)
    enc = encoder(num_blocks=2)
    p, n, f = cloud(g)
    u, p2, n2, _, _ = move("e3_odd", g, p, n)
    out_mv, out_s = enc(p, n, f)
    # a mirrored cloud is equivariant when passed as oriented points of weight -1
    mv2, s2 = enc(p2, n2, f, orientation=-1.0)
    torch.testing.assert_close(mv2, sandwich(u, out_mv), **TOL)
    torch.testing.assert_close(s2, out_s, **TOL)
    # with unoriented (+1) input it is not: PGA points are oriented (with one block the
    # scalars happen to be even in the point weight, hence two blocks here)
    assert (enc(p2, n2, f)[1] - out_s).abs().max() > 1e-6
    # symmetrized over orientations it is E(3)-equivariant for plain point clouds
    sym = encoder(num_blocks=2, symmetrize_orientation=True)
    o_mv, o_s = sym(p, n, f)
    m3, s3 = sym(p2, n2, f)
    torch.testing.assert_close(m3, sandwich(u, o_mv), **TOL)
    torch.testing.assert_close(s3, o_s, **TOL)


def test_point_encoder_inputs_and_config():
    g = gen(20)
    p, n, f = cloud(g)
    enc = encoder(use_normals=False, in_features=0)
    mv, s = enc.embed(p)
    assert mv.shape == (2, 8, 1, 16) and torch.equal(s, torch.ones(2, 8, 1, dtype=DT))
    torch.testing.assert_close(extract_point(mv[..., 0, :]), p, **TOL)
    assert json.loads(json.dumps(enc.config)) == enc.config
    with pytest.raises(ValueError, match="normals given"):
        enc(p, n)
    with pytest.raises(ValueError, match="points must have shape"):
        enc(p[..., :2])
    enc2 = encoder()
    with pytest.raises(ValueError, match="uses normals"):
        enc2(p, features=f)
    with pytest.raises(ValueError, match="features must have shape"):
        enc2(p, n, f[..., :1])
    # normals embed as the plane through each point
    mv2, _ = enc2.embed(p, n, f)
    plane = mv2[..., 1, :]
    torch.testing.assert_close(plane[..., 2:5], n, **TOL)
    torch.testing.assert_close((plane[..., 2:5] * p).sum(-1) + plane[..., 1], torch.zeros(2, 8, dtype=DT), **TOL)


# --- compile and GPU (not run by default) --------------------------------------------------


@pytest.mark.slow
def test_gatr_compiles_fullgraph():
    """No graph breaks (the eager table caches are bypassed under torch.compile)."""
    net = small_gatr().float().eval()
    g = gen(21)
    mv, s = rand_inputs(g, lead=(2, 5), c=2, s=3)
    mv, s = mv.float(), s.float()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    compiled = torch.compile(net, fullgraph=True)
    with torch.no_grad():
        got, want = compiled(mv, s, mask=mask), net(mv, s, mask=mask)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_gatr_cuda_equivariance(dtype, tol):
    net = small_gatr().to("cuda", dtype)
    g = gen(22)
    mv, s = (x.to("cuda", dtype) for x in rand_inputs(g, lead=(2, 64), c=2, s=3))
    u = versor_for("e3_odd", g).to("cuda", dtype)
    out_mv, out_s = net(mv, s)
    mv2, s2 = net(sandwich(u, mv), s)
    torch.testing.assert_close(mv2, sandwich(u, out_mv), rtol=tol, atol=tol)
    torch.testing.assert_close(s2, out_s, rtol=tol, atol=tol)


def test_training_after_first_use_under_inference_mode():
    """Tables cached during a validation pass (inference_mode) must still work in backward."""
    from equiformer.ga import algebra, layers
    from equiformer.ga.net import GATr

    algebra._table_cached.cache_clear()
    layers._basis_cached.cache_clear()
    layers._gp_join_cached.cache_clear()
    layers._channel_mean_mask_cached.cache_clear()
    torch.manual_seed(0)
    net = GATr(in_mv_channels=1, out_mv_channels=1, hidden_mv_channels=4, in_s_channels=1, out_s_channels=1,
               hidden_s_channels=4, num_blocks=1, num_heads=1)
    mv, s = torch.randn(2, 5, 1, 16), torch.randn(2, 5, 1)
    with torch.inference_mode():
        net(mv, s)
    out_mv, out_s = net(mv, s)
    (out_mv.square().sum() + out_s.square().sum()).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_attention_pads_heads_for_fused_kernels_without_changing_the_result():
    """Padding q/k/v to a common multiple of 8 leaves the attention output unchanged."""
    from equiformer.ga.attention import attention_features, geometric_attention

    g = torch.Generator().manual_seed(3)
    B, H, N, C, S = 2, 3, 7, 3, 5  # feature sizes 3*(8+5)+5 = 44 (q/k) and 16*3+5 = 53 (v)
    q_mv, k_mv, v_mv = (torch.randn(B, H, N, C, 16, generator=g, dtype=torch.float64) for _ in range(3))
    q_s, k_s, v_s = (torch.randn(B, H, N, S, generator=g, dtype=torch.float64) for _ in range(3))
    mv, s = geometric_attention(q_mv, k_mv, v_mv, q_s, k_s, v_s)
    q, k = attention_features(q_mv, q_s, "query", True), attention_features(k_mv, k_s, "key", True)
    assert q.shape[-1] % 8 != 0  # the case the padding exists for
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    ref = weights @ torch.cat([v_mv.flatten(-2), v_s], dim=-1)
    torch.testing.assert_close(mv, ref[..., : 16 * C].unflatten(-1, (C, 16)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, ref[..., 16 * C :], rtol=1e-12, atol=1e-12)


def test_sdpa_head_width():
    from equiformer.ga.attention import sdpa_head_width

    assert [sdpa_head_width(q, v) for q, v in ((42, 48), (13, 17), (8, 8), (64, 40), (1, 1))] == [48, 24, 8, 64, 8]


@pytest.mark.parametrize("head_s,width", [(0, 16), (3, 24), (8, 24), (19, 40), (35, 56)])
def test_geometric_attention_pads_to_sdpa_head_width(head_s, width, monkeypatch):
    """q, k and v reach SDPA with one head size, a multiple of 8 (one mv channel per head:
    q/k 13 + head_s features, v 16 + head_s), and the padding does not change the result."""
    from equiformer.ga import attention

    seen = {}
    real = attention.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen["shapes"] = (q.shape[-1], k.shape[-1], v.shape[-1])
        return real(q, k, v, **kw)

    g = gen(5)
    mv = torch.randn(1, 2, 5, 1, 16, generator=g, dtype=torch.float64)
    s = torch.randn(1, 2, 5, head_s, generator=g, dtype=torch.float64)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    out_mv, out_s = attention.geometric_attention(mv, mv, mv, s, s, s)
    assert seen["shapes"] == (width, width, width)
    assert width == attention.sdpa_head_width(13 + head_s, 16 + head_s)
    # unpadded reference: softmax(q.k / sqrt(d_qk)) v
    q = attention.attention_features(mv, s, "query")
    k = attention.attention_features(mv, s, "key")
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    torch.testing.assert_close(out_mv.flatten(-2), w @ mv.flatten(-2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_s, w @ s, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gatr_attention_runs_on_flash_and_efficient_kernels():
    """With the padded head size the fused kernels accept GATr's q/k/v (no silent math fallback)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from equiformer.ga.attention import geometric_attention

    g = torch.Generator(device="cpu").manual_seed(0)
    for backend, dtype in ((SDPBackend.FLASH_ATTENTION, torch.bfloat16), (SDPBackend.EFFICIENT_ATTENTION, torch.float32)):
        mv = torch.randn(1, 8, 256, 2, 16, generator=g).to("cuda", dtype).requires_grad_()
        s = torch.randn(1, 8, 256, 16, generator=g).to("cuda", dtype).requires_grad_()
        with sdpa_kernel([backend]):
            o_mv, o_s = geometric_attention(mv, mv, mv, s, s, s)
            (o_mv.float().sum() + o_s.float().sum()).backward()
        ref_mv, ref_s = geometric_attention(mv.double(), mv.double(), mv.double(), s.double(), s.double(), s.double())
        tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(o_mv.double(), ref_mv, rtol=tol, atol=tol)
        torch.testing.assert_close(o_s.double(), ref_s, rtol=tol, atol=tol)


# --- the fused layouts equal the straightforward formulas (values and gradients) ------------


def _randomize(module, seed):
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, dtype=p.dtype, generator=g) * 0.5)


def _standard_linear(lin: EquiLinear, mv, s):
    """EquiLinear in its standard layout, from the documented basis-sum formula."""
    return _equilinear_unfused(lin, mv, s)


def _values_and_grads(fn, inputs, params, seed=0):
    out = fn(*inputs)
    g = gen(seed)
    loss = sum((o * torch.randn(o.shape, dtype=o.dtype, generator=g)).sum() for o in out)
    return out, torch.autograd.grad(loss, [*inputs, *params], allow_unused=True)


def _assert_same(got, want, rtol=1e-12):
    for a, b in zip(got, want):
        scale = b.abs().max().clamp_min(1.0)
        assert a.shape == b.shape
        torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=rtol)


@pytest.mark.parametrize("distance,head_s", [(True, 3), (True, 11), (False, 3), (False, 8)])
def test_self_attention_layout_matches_reference(distance, head_s):
    """SelfAttention's reordered qkv / out GEMMs and joint q/k features compute exactly the
    straightforward per-role formula (standard EquiLinears, attention_features, unpadded SDPA)."""
    torch.manual_seed(0)
    attn = SelfAttention(3, 5, num_heads=2, head_mv=2, head_s=head_s, out_mv=4, out_s=6, distance=distance).double()
    _randomize(attn, 1)
    g = gen(2)
    mv, s = rand_inputs(g, lead=(2, 7), c=3, s=5)
    mv.requires_grad_(True)
    s.requires_grad_(True)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    h, cm, cs = 2, 2, head_s

    def reference(mv, s):
        qkv_mv, qkv_s = _standard_linear(attn.qkv, mv, s)
        qkv_mv = qkv_mv.reshape(2, 7, 3, h, cm, 16).permute(2, 0, 3, 1, 4, 5)  # [3, B, H, N, cm, 16]
        qkv_s = qkv_s.reshape(2, 7, 3, h, cs).permute(2, 0, 3, 1, 4)
        q = attention_features(qkv_mv[0], qkv_s[0], "query", distance)
        k = attention_features(qkv_mv[1], qkv_s[1], "key", distance)
        v = torch.cat([qkv_mv[2].flatten(-2), qkv_s[2]], dim=-1)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        o = logits.softmax(-1) @ v  # [B, H, N, 16 cm + cs]
        o_mv = o[..., : 16 * cm].unflatten(-1, (cm, 16)).permute(0, 2, 1, 3, 4).reshape(2, 7, h * cm, 16)
        o_s = o[..., 16 * cm :].permute(0, 2, 1, 3).reshape(2, 7, h * cs)
        return _standard_linear(attn.out, o_mv, o_s)

    from equiformer.ga.attention import attention_features

    params = list(attn.parameters())
    got, g_got = _values_and_grads(lambda a, b: attn(a, b, mask=mask), (mv, s), params)
    want, g_want = _values_and_grads(reference, (mv, s), params)
    _assert_same(got, want)
    _assert_same(g_got, g_want)
    assert all(x is not None for x in g_got)
    assert set(attn.state_dict()) == {n for n, _ in attn.named_parameters()}  # layouts stay out of checkpoints


@pytest.mark.parametrize("with_ref,in_s", [(True, 4), (False, 4), (True, 0)])
def test_geometric_bilinear_layout_matches_reference(with_ref, in_s):
    """One GEMM against the [256, 32] (product, join) table and the column-padded output map
    equal the straightforward geometric_product / join of the standard EquiLinear outputs."""
    from equiformer.ga import geometric_product, join

    torch.manual_seed(0)
    layer = GeometricBilinear(3, 4, in_s, 2, hidden_mv=6).double()
    _randomize(layer, 3)
    g = gen(4)
    mv, s = rand_inputs(g, lead=(2, 5), c=3, s=in_s)
    ref = torch.randn(2, 1, 16, dtype=DT, generator=g)
    inputs = [mv.requires_grad_(True), s.requires_grad_(True), ref.requires_grad_(True)]

    def reference(mv, s, r):
        hid, _ = _standard_linear(layer.inputs, mv, s)
        gl, gr, jl, jr = hid.split(3, dim=-2)
        jn = join(jl, jr, r.unsqueeze(-2) if with_ref else None)
        return _standard_linear(layer.output, torch.cat([geometric_product(gl, gr), jn], dim=-2), s)

    params = list(layer.parameters())
    got, g_got = _values_and_grads(lambda a, b, r: layer(a, b, reference=r if with_ref else None), inputs, params)
    want, g_want = _values_and_grads(reference, inputs, params)
    _assert_same(got, want)
    assert [x is None for x in g_got] == [x is None for x in g_want]
    _assert_same([x for x in g_got if x is not None], [x for x in g_want if x is not None])
    assert set(layer.state_dict()) == {n for n, _ in layer.named_parameters()}


def test_equilinear_set_layout_reorders_and_pads_only():
    """A custom layout is the standard matrix with rows / columns permuted and zero rows / columns
    inserted; forward() and fused_weight() keep the standard meaning."""
    torch.manual_seed(0)
    lin = EquiLinear(2, 3, 4, 5).double()
    _randomize(lin, 5)
    w_std, b_std = lin.fused_weight()
    g = torch.Generator().manual_seed(6)
    rows = torch.cat([torch.randperm(53, generator=g), torch.tensor([-1, -1])])[torch.randperm(55, generator=g)]
    cols = torch.cat([torch.randperm(36, generator=g), torch.tensor([-1])])[torch.randperm(37, generator=g)]
    mv, s = rand_inputs(gen(7), lead=(4,), c=2, s=4)
    want = lin(mv, s)
    lin.set_layout(rows=rows, cols=cols)
    w, b = lin.layout_weight()
    assert w.shape == (55, 37) and b.shape == (55,)
    keep_r, keep_c = rows >= 0, cols >= 0
    torch.testing.assert_close(w[keep_r][:, keep_c], w_std[rows[keep_r]][:, cols[keep_c]], rtol=0, atol=0)
    assert not w[~keep_r].any() and not w[:, ~keep_c].any() and not b[~keep_r].any()
    torch.testing.assert_close(b[keep_r], b_std[rows[keep_r]], rtol=0, atol=0)
    got = lin(mv, s)  # standard meaning regardless of the layout
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)
    x = torch.cat([mv.flatten(-2), s], -1)
    x_layout = torch.where(keep_c, x[..., cols.clamp_min(0)], torch.zeros(()))
    y = lin.linear_flat(x_layout)
    y_std = torch.cat([want[0].flatten(-2), want[1]], -1)
    torch.testing.assert_close(y[..., keep_r], y_std[..., rows[keep_r]], **TOL)
    assert not y[..., ~keep_r].any()
    with pytest.raises(ValueError, match="layout rows"):
        lin.set_layout(rows=torch.tensor([53]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_self_attention_layout_runs_on_flash_and_efficient_kernels():
    """SelfAttention hands SDPA strided q/k/v views of its GEMM output: the fused kernels must
    accept them (no error under a single-backend context) and agree with float64."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    attn = SelfAttention(16, 128, num_heads=8, head_mv=2, head_s=16).to("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    mv = torch.randn(2, 300, 16, 16, generator=g).to("cuda")
    s = torch.randn(2, 300, 128, generator=g).to("cuda")
    ref_attn = SelfAttention(16, 128, num_heads=8, head_mv=2, head_s=16).to("cuda", torch.float64)
    ref_attn.load_state_dict(attn.state_dict())
    ref = ref_attn(mv.double(), s.double())
    for backend, dtype in ((SDPBackend.FLASH_ATTENTION, torch.bfloat16), (SDPBackend.EFFICIENT_ATTENTION, torch.float32)):
        x_mv, x_s = mv.clone().requires_grad_(), s.clone().requires_grad_()
        with sdpa_kernel([backend]), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            o_mv, o_s = attn(x_mv, x_s)
            (o_mv.float().sum() + o_s.float().sum()).backward()
        tol = 1e-1 if dtype == torch.bfloat16 else 1e-3
        torch.testing.assert_close(o_mv.double(), ref[0], rtol=tol, atol=tol)
        torch.testing.assert_close(o_s.double(), ref[1], rtol=tol, atol=tol)
