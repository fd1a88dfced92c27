"""Radial features of edge lengths: bases, a smooth cutoff envelope and the radial MLP.

Distances are in Å; every module maps ``r`` [E] to features [E, num_basis].
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor, nn

__all__ = [
    "BesselRadialBasis",
    "GaussianRadialBasis",
    "PolynomialEnvelope",
    "RadialMLP",
    "build_radial_basis",
]


class GaussianRadialBasis(nn.Module):
    """Learnable Gaussians of the scaled distance (Equiformer's basis, after Graphormer-3D).

    ``x = w * r / cutoff + b``; ``phi_k(x) = exp(-((x - mu_k) / s_k)^2 / 2) / (sqrt(2 pi) s_k)``, with
    ``mu_k ~ U(0, 1)``, ``s_k ~ U(1/K, 1)`` at initialisation (drawn from torch's global generator).

    Args:
        num_basis: K.
        cutoff: Å.
        trainable: learn ``mu, s, w, b`` (the paper does).
    """

    def __init__(self, num_basis: int, cutoff: float, trainable: bool = True) -> None:
        super().__init__()
        self.num_basis = int(num_basis)
        self.cutoff = float(cutoff)
        mean = torch.empty(self.num_basis).uniform_(0.0, 1.0)
        std = torch.empty(self.num_basis).uniform_(1.0 / self.num_basis, 1.0)
        params = {"mean": mean, "std": std, "scale": torch.ones(1), "offset": torch.zeros(1)}
        for name, value in params.items():
            if trainable:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    def forward(self, r: Tensor) -> Tensor:
        """r [E] Å -> [E, K]."""
        x = (r / self.cutoff).unsqueeze(-1) * self.scale + self.offset
        std = self.std.abs() + 1e-5
        return torch.exp(-0.5 * ((x - self.mean) / std) ** 2) / (math.sqrt(2 * math.pi) * std)

    def extra_repr(self) -> str:
        return f"num_basis={self.num_basis}, cutoff={self.cutoff}"


class BesselRadialBasis(nn.Module):
    """Spherical Bessel functions of order 0: ``sqrt(2/c) sin(k pi r / c) / r``, k = 1..K (DimeNet).

    Args:
        num_basis: K.
        cutoff: c in Å.
        trainable: learn the frequencies ``k pi``.
    """

    def __init__(self, num_basis: int, cutoff: float, trainable: bool = False) -> None:
        super().__init__()
        self.num_basis = int(num_basis)
        self.cutoff = float(cutoff)
        freq = torch.arange(1, self.num_basis + 1, dtype=torch.get_default_dtype()) * math.pi
        if trainable:
            self.freq = nn.Parameter(freq)
        else:
            self.register_buffer("freq", freq)

    def forward(self, r: Tensor) -> Tensor:
        """r [E] Å (> 0) -> [E, K]."""
        x = (r / self.cutoff).unsqueeze(-1)
        return math.sqrt(2.0 / self.cutoff) * torch.sin(self.freq * x) / r.unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"num_basis={self.num_basis}, cutoff={self.cutoff}"


class PolynomialEnvelope(nn.Module):
    """Smooth cutoff ``u(x) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2)``, ``x = r / cutoff``.

    ``u(0) = 1``; ``u``, ``u'`` and ``u''`` vanish at the cutoff; 0 beyond it (DimeNet, without its 1/x).
    Evaluated as ``(1-x)^3 q(x)`` so that it stays accurate (and non-negative) next to the cutoff,
    where the expanded form loses everything to cancellation.

    Args:
        cutoff: Å.
        exponent: p >= 1.
    """

    def __init__(self, cutoff: float, exponent: int = 5) -> None:
        super().__init__()
        if exponent < 1:
            raise ValueError(f"PolynomialEnvelope: exponent must be >= 1, got {exponent}")
        self.cutoff = float(cutoff)
        self.exponent = int(exponent)
        self._q = [float(c) for c in _divide_by_cube_of_one_minus_x(self.exponent)]  # q's coefficients, x^0 first

    def forward(self, r: Tensor) -> Tensor:
        """r [E] Å -> [E] in [0, 1]."""
        x = r / self.cutoff
        t = (self.cutoff - r).clamp_min(0.0) / self.cutoff  # 1 - x, exact near the cutoff
        q = torch.full_like(x, self._q[-1])
        for c in reversed(self._q[:-1]):
            q = q * x + c
        return t * t * t * q

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, exponent={self.exponent}"


def _divide_by_cube_of_one_minus_x(p: int) -> list[Fraction]:
    """Coefficients of q with u(x) = (1-x)^3 q(x), in exact rational arithmetic."""
    u = [Fraction(0)] * (p + 3)
    u[0] = Fraction(1)
    u[p] = Fraction(-(p + 1) * (p + 2), 2)
    u[p + 1] = Fraction(p * (p + 2))
    u[p + 2] = Fraction(-p * (p + 1), 2)
    for _ in range(3):  # divide by (1 - x) three times: a_k = sum_{j<=k} u_j
        quotient, total = [], Fraction(0)
        for coefficient in u[:-1]:
            total += coefficient
            quotient.append(total)
        if total + u[-1] != 0:
            raise AssertionError("envelope is not divisible by (1-x)")
        u = quotient
    return u


class RadialMLP(nn.Module):
    """MLP of radial features: ``[Linear -> LayerNorm -> SiLU] * (n-2) -> Linear`` (Equiformer's RadialProfile).

    Hidden biases start at 0; the output bias at ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

    Args:
        channels: ``[in, hidden..., out]``, at least two entries.
        layer_norm: LayerNorm after each hidden Linear.
    """

    def __init__(self, channels: list[int], layer_norm: bool = True) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"RadialMLP needs at least [in, out] channels, got {channels}")
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            linear = nn.Linear(c_in, c_out)
            last = i == len(channels) - 2
            if last:
                bound = 1.0 / math.sqrt(c_in)
                nn.init.uniform_(linear.bias, -bound, bound)
            else:
                nn.init.zeros_(linear.bias)
            layers.append(linear)
            if not last:
                if layer_norm:
                    layers.append(nn.LayerNorm(c_out))
                layers.append(nn.SiLU())
        self.net = nn.Sequential(*layers)
        self.channels = list(channels)

    def forward(self, x: Tensor) -> Tensor:
        """x [E, in] -> [E, out]."""
        return self.net(x)


def build_radial_basis(name: str, num_basis: int, cutoff: float) -> nn.Module:
    """``"gaussian"`` (learnable, Equiformer's) or ``"bessel"``."""
    if name == "gaussian":
        return GaussianRadialBasis(num_basis, cutoff)
    if name == "bessel":
        return BesselRadialBasis(num_basis, cutoff)
    raise ValueError(f"unknown radial basis {name!r}; choose 'gaussian' or 'bessel'")
