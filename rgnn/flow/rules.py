"""The statistics of the flow and their layer-to-layer updates, each written once.

Every statistic is a tensor over the inputs of one set (``[m, m]`` or ``[m, m, m, m]``), zero
on the first layer, and has one update rule ``X^{(l+1)} = rule(statistics of layer l)`` written
in index notation (:mod:`rgnn.flow.tensor`) with the Gaussian moments of layer ``l``
(:class:`rgnn.flow.moments.Moments`). Notation: ``n = n_l``, ``r = n_l / n_{l-1}``,
``inv = 1 / n_{l-1}``, ``K, Theta`` the layer's leading-order kernels, ``<.>`` the Gaussian
average under ``K``, ``s_a = sigma(z_a)``, primes derivatives, ``D_c(f) = <d_c f>``,
``lambda_W`` the weights' learning-rate scaling of layer ``l + 1``. Sources: PDLT ch. 4
(``V``, ``Delta``), ch. 8 (``A, B, D, F`` and the NTK mean shift), ch. 11 (``P, Q``), ch. infinity
(``R, S, T, U``), written with derivatives instead of inverse kernels; the derivations by
conditional averages are in :mod:`rgnn._ntk_flow` and :mod:`rgnn._dntk_flow`.

================  ============================================================  ==============
statistic         meaning (all ``n_{l-1}`` times a covariance or mean)            needs
================  ============================================================  ==============
``V``             four-point vertex, ``Cov(G_ab, G_cd)``                          V
``DG``            mean-kernel shift ``E z_a z_b - K_ab`` (``n`` times)             V, DG
``D``             NNGP-NTK cross vertex ``Cov(G_ab, H~_cd)``                      V, D
``A``             NTK vertex ``Cov(H~_ab, H~_cd)``                                V, D, A
``DH``            NTK mean shift ``E H_ab - Theta_ab``                            V, D, DG, F, DH
``F``             ``E[H_{12;ab} z_{1c} z_{2d}]``                                  F
``B``             ``E[H_{12;ab} H_{12;cd}]`` as ``B_{acbd}``                      B
``P, Q``          dNTK-preactivation correlators (PDLT eq. 11.?)                 F, B, P / Q
``PH, QH``        the same for the Hessian-form dNTK                              B, F, PH / QH
``R, S, T, U``    the ddNTK means                                                 B, F, PH, QH
================  ============================================================  ==============

The tensors' index layouts follow the docstrings of :class:`rgnn.Perturbative`.
"""

from __future__ import annotations

from rgnn.flow.tensor import L, ein, extract

DEPENDS = {
    "V": ("V",),
    "DG": ("V", "DG"),
    "D": ("V", "D"),
    "A": ("V", "D", "A"),
    "DH": ("V", "D", "DG", "F", "DH"),
    "F": ("F",),
    "B": ("B",),
    "P": ("F", "P"),
    "Q": ("F", "B", "Q"),
    "PH": ("B", "PH"),
    "QH": ("F", "QH"),
    "R": ("B", "PH", "R"),
    "S": ("B", "S"),
    "T": ("F", "QH", "T"),
    "U": ("U",),
}
RANK = {"DG": 2, "DH": 2}  # every other statistic has four indices
KMAX = {  # the highest derivative of sigma each update's moments need
    "V": 2,
    "DG": 4,
    "D": 3,
    "A": 3,
    "DH": 5,
    "F": 2,
    "B": 1,
    "P": 3,
    "Q": 3,
    "PH": 2,
    "QH": 3,
    "R": 3,
    "S": 2,
    "T": 3,
    "U": 2,
}


def closure(names) -> tuple[str, ...]:
    """``names`` with everything their updates need, in a fixed order."""
    need = set()
    todo = list(names)
    while todo:
        n = todo.pop()
        if n not in need:
            need.add(n)
            todo.extend(DEPENDS[n])
    return tuple(n for n in DEPENDS if n in need)


class Layer:
    """What one layer's updates read: moments ``M``, the statistics ``old``, constants."""

    def __init__(self, m, old, theta, *, cw, lw, r, inv):
        self.M = m
        self.old = old
        self.theta = theta
        self.cw, self.lw, self.r, self.inv = cw, lw, r, inv

    def S(self, name, ix):
        return L(self.old[name], ix)

    def T(self, ix):
        return L(self.theta, ix)

    def diag(self, name, sel, ix):
        """``old[name]`` with repeated letters (``sel``, e.g. ``"aacd"``) labelled ``ix``."""
        return extract(self.old[name], sel).to(ix)


def _v(c: Layer):
    M, cw = c.M, c.cw
    cov = M.e((0, 0, 0, 0), "abcd") - M.e((0, 0), "ab") * M.e((0, 0), "cd")
    prop = M.price1(0, M.price1(0, c.S("V", "efgh"), "gh", "cd"), "ef", "ab")
    return (cw * cw * cov + c.r * cw * cw * prop).to("abcd")


def _dg(c: Layer):
    M, cw = c.M, c.cw
    return (
        cw * M.price1(0, c.S("DG", "ef"), "ef", "ab")
        + 0.5 * c.inv * cw * M.price2(0, c.S("V", "efgh"))
    ).to("ab")


def _jhk(c: Layer, x: L, pair: str, out: str) -> L:
    """``sum_ef (d H~'_out / d G_ef) X_ef``: ``lambda_W dphi + C_W Theta dpsi``."""
    M = c.M
    return c.lw * M.price1(0, x, pair, out) + c.cw * c.T(out) * M.price1(1, x, pair, out)


def _cov_ss_dd(c: Layer):
    M = c.M
    css = M.e((0, 0, 0, 0), "abcd") - M.e((0, 0), "ab") * M.e((0, 0), "cd")
    csd = M.e((0, 0, 1, 1), "abcd") - M.e((0, 0), "ab") * M.e((1, 1), "cd")
    cdd = M.e((1, 1, 1, 1), "abcd") - M.e((1, 1), "ab") * M.e((1, 1), "cd")
    return css, csd, cdd


def _d(c: Layer):
    M, cw, lw = c.M, c.cw, c.lw
    css, csd, _ = _cov_ss_dd(c)
    src = cw * (lw * css + cw * csd * c.T("cd"))
    jht = cw * M.e((1, 1), "cd")
    prop = cw * M.price1(0, _jhk(c, c.S("V", "efgh"), "gh", "cd"), "ef", "ab")
    prop = prop + cw * M.price1(0, c.S("D", "efcd"), "ef", "ab") * jht
    return (src + c.r * prop).to("abcd")


def _a(c: Layer):
    M, cw, lw = c.M, c.cw, c.lw
    css, csd, cdd = _cov_ss_dd(c)
    sd = csd * c.T("cd")
    src = (
        lw * lw * css
        + lw * cw * (sd + sd.to("abcd").rename("cdab"))
        + cw * cw * cdd * c.T("ab") * c.T("cd")
    )
    jab, jcd = cw * M.e((1, 1), "ab"), cw * M.e((1, 1), "cd")
    vv = _jhk(c, _jhk(c, c.S("V", "efgh"), "gh", "cd"), "ef", "ab")
    x = _jhk(c, c.S("D", "efcd"), "ef", "ab") * jcd
    prop = vv + x + x.to("abcd").rename("cdab") + jab * jcd * c.S("A", "abcd")
    return (src + c.r * prop).to("abcd")


def _dh(c: Layer):
    M, cw, lw = c.M, c.cw, c.lw
    jht = cw * M.e((1, 1), "ab")
    v = c.S("V", "efgh")
    hess = 0.5 * (lw * M.price2(0, v) + cw * c.T("ab") * M.price2(1, v))
    cross = cw * M.price1_own(1, c.S("D", "efab").to("abef"))
    xi = 2.0 * cw * M.price1_own(1, c.S("F", "abef"))
    return (
        _jhk(c, c.S("DG", "ef"), "ef", "ab") + jht * c.S("DH", "ab") + c.inv * (hess + cross + xi)
    ).to("ab")


def _f(c: Layer):
    M, cw = c.M, c.cw
    src = M.e((1, 0, 1, 0), "acbd") * c.T("ab")
    prop = ein("abcd", M.d((1, 0), "eac"), c.S("F", "abef"), M.d((1, 0), "fbd"))
    return (cw * cw * (src + c.r * prop)).to("abcd")


def _b(c: Layer):
    M, cw = c.M, c.cw
    src = M.e((1, 1, 1, 1), "abcd") * c.T("ac") * c.T("bd")
    prop = M.e((1, 1), "ab") * M.e((1, 1), "cd") * c.S("B", "abcd")
    return (cw * cw * (src + c.r * prop)).to("abcd")


def _p(c: Layer):
    M, cw, lw, T = c.M, c.cw, c.lw, c.T
    e, d = M.e, M.d
    src = lw * cw * (e((1, 0, 1, 0), "adbc") * T("ab") + e((1, 0, 0, 1), "adbc") * T("ac"))
    src = src + cw * cw * T("bc") * (
        e((1, 0, 2, 1), "adbc") * T("ab") + e((1, 0, 1, 2), "adbc") * T("ac")
    )
    lead = d((1, 0), "ead")
    g1 = lw * cw * d((1, 0), "fbc") + cw * cw * T("bc") * d((2, 1), "fbc")
    g2 = lw * cw * d((0, 1), "fbc") + cw * cw * T("bc") * d((1, 2), "fbc")
    prop = (
        ein("abcd", lead, c.S("F", "abef"), g1)
        + ein("abcd", lead, c.S("F", "acef"), g2)
        + cw * cw * ein("abcd", e((1, 1), "bc"), c.S("P", "abce"), lead)
    )
    return (src + c.r * prop).to("abcd")


def _q(c: Layer):
    M, cw, lw, T = c.M, c.cw, c.lw, c.T
    e, d = M.e, M.d
    src = lw * cw * e((0, 1, 1, 0), "abcd") * T("bc") + cw * cw * T("bc") * (
        e((1, 2, 1, 0), "abcd") * T("ab") + e((1, 1, 2, 0), "abcd") * T("ac")
    )
    s01 = e((1, 1), "ab")
    tail = d((1, 0), "ecd")
    head = lw * cw * d((0, 1), "fab") + cw * cw * T("ab") * d((1, 2), "fab")
    prop = (
        cw * cw * s01 * c.diag("B", "abcc", "abc") * e((2, 0), "cd")
        + cw * cw * ein("abcd", s01, c.S("Q", "abce"), tail)
        + ein("abcd", c.S("F", "bcfe"), head, tail)
    )
    return (src + c.r * prop).to("abcd")


def _ph(c: Layer):
    M, cw, T = c.M, c.cw, c.T
    e, d = M.e, M.d
    src = e((2, 0, 1, 1), "adbc") * T("ab") * T("ac")
    prop = c.diag("B", "aabc", "abc") * e((2, 0), "ad") * e((1, 1), "bc") + ein(
        "abcd", e((1, 1), "bc"), c.S("PH", "abcg"), d((1, 0), "gad")
    )
    return (cw * cw * (src + c.r * prop)).to("abcd")


def _qh(c: Layer):
    M, cw, lw, T = c.M, c.cw, c.lw, c.T
    e, d = M.e, M.d
    dcd = d((1, 0), "hcd")
    ff = ein("abcd", c.S("F", "acgh"), d((1, 0), "gab"), dcd)
    ff2 = ein("abcd", c.S("F", "acgh"), d((2, 1), "gab"), dcd)
    qq = ein("abcd", c.S("QH", "abcg"), d((1, 0), "gcd"))
    out = lw * cw * (e((1, 0, 1, 0), "abcd") * T("ac") + c.r * ff) + cw * cw * (
        e((2, 1, 1, 0), "abcd") * T("ab") * T("ac") + c.r * (T("ab") * ff2 + e((1, 1), "ab") * qq)
    )
    return out.to("abcd")


def _r(c: Layer):
    M, cw, lw, T = c.M, c.cw, c.lw, c.T
    e, d = M.e, M.d
    scd = e((1, 1), "cd")
    baacd = c.diag("B", "aacd", "acd")
    pp1 = ein("abcd", c.S("PH", "acdg"), d((1, 0), "gab"))
    pp2 = ein("abcd", c.S("PH", "acdg"), d((2, 1), "gab"))
    lam = e((2, 0, 1, 1), "abcd") * T("ac") * T("ad") + c.r * scd * (baacd * e((2, 0), "ab") + pp1)
    cc = e((3, 1, 1, 1), "abcd") * T("ab") * T("ac") * T("ad") + c.r * scd * (
        T("ab") * baacd * e((3, 1), "ab") + T("ab") * pp2 + e((1, 1), "ab") * c.S("R", "abcd")
    )
    return (lw * cw * lam + cw * cw * cc).to("abcd")


def _s(c: Layer):
    M, cw, lw, T = c.M, c.cw, c.lw, c.T
    e = M.e
    sab, scd = e((1, 1), "ab"), e((1, 1), "cd")
    b = c.S("B", "abcd")
    lam = e((1, 1, 1, 1), "abcd") * T("ac") * T("bd") + c.r * b * sab * scd
    cc = e((2, 2, 1, 1), "abcd") * T("ab") * T("ac") * T("bd") + c.r * (
        T("ab") * b * e((2, 2), "ab") * scd + sab * scd * c.S("S", "abcd")
    )
    return (lw * cw * lam + cw * cw * cc).to("abcd")


def _t(c: Layer):
    # T_{abcd} = T_{1342}: inputs 1 = a, 3 = b, 4 = c, 2 = d
    M, cw, lw, T = c.M, c.cw, c.lw, c.T
    e, d = M.e, M.d

    def fsum(s1, s2):
        return ein("abcd", c.S("F", "adgh"), d(s1, "gab"), d(s2, "hdc"))

    sab, sdc = e((1, 1), "ab"), e((1, 1), "dc")
    q1 = ein("abcd", c.S("QH", "dcag"), d((1, 0), "gab"))
    q2 = ein("abcd", c.S("QH", "abdg"), d((1, 0), "gdc"))
    q1b = ein("abcd", c.S("QH", "dcag"), d((2, 1), "gab"))
    q2b = ein("abcd", c.S("QH", "abdg"), d((2, 1), "gdc"))
    ll = e((1, 0, 1, 0), "abdc") * T("ad") + c.r * fsum((1, 0), (1, 0))
    lc = (
        e((1, 0, 2, 1), "abdc") * T("ad") * T("dc")
        + e((2, 1, 1, 0), "abdc") * T("ad") * T("ab")
        + c.r
        * (T("dc") * fsum((1, 0), (2, 1)) + T("ab") * fsum((2, 1), (1, 0)) + sdc * q1 + sab * q2)
    )
    cc = e((2, 1, 2, 1), "abdc") * T("ad") * T("ab") * T("dc") + c.r * (
        T("ab") * T("dc") * fsum((2, 1), (2, 1))
        + T("ab") * sdc * q1b
        + T("dc") * sab * q2b
        + sab * sdc * c.S("T", "abcd")
    )
    return (lw * lw * ll + lw * cw * lc + cw * cw * cc).to("abcd")


def _u(c: Layer):
    # U_{abcd} = U_{1423}: inputs 1 = a, 4 = b, 2 = c, 3 = d
    M, cw, T = c.M, c.cw, c.T
    e = M.e
    src = e((2, 2, 1, 1), "acdb") * T("ac") * T("ad") * T("cb")
    prop = e((1, 1), "ab") * e((1, 1), "cd") * c.S("U", "abcd")
    return (cw * cw * (src + c.r * prop)).to("abcd")


RULES = {
    "V": _v,
    "DG": _dg,
    "D": _d,
    "A": _a,
    "DH": _dh,
    "F": _f,
    "B": _b,
    "P": _p,
    "Q": _q,
    "PH": _ph,
    "QH": _qh,
    "R": _r,
    "S": _s,
    "T": _t,
    "U": _u,
}
