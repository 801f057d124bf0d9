"""``RowSpec``: the options of one row-loss call as ONE value, and ``SpecOp``: the custom-op
boundary, the only place where the spec is unpacked into primitive arguments.

Everything between the public ops and the backend primitives passes a ``RowSpec``; the keyword
arguments of each primitive come from ``stats_kw`` / ``jsd_kw`` / ``grad_kw``. A custom op's
schema, written out where the op is defined, is its tensor inputs followed by ``ROW_SPEC_SCHEMA``
(the spec's fields, written out below and checked against the dataclass at import); its
backward's ``None`` padding is derived from the input count. A new option is a new field
(str/int/float/bool), its line in ``ROW_SPEC_SCHEMA`` and its entries in the ``*_kw`` methods.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

_SCHEMA_TYPES = {"str": "str", "float": "float", "int": "int", "bool": "bool"}
MODELS = ("s", "t", "r")  # student, teacher, reference: the prefixes of the transform fields


@dataclass(frozen=True)
class RowSpec:
    """What one call computes per row.

    kind:     a backend kind (``backends.KINDS``) or ``"log_normalizer"`` (``A = logsumexp(a)``,
              differentiable; the sparse ops' full-vocabulary part).
    inv_temp: ``1 / temperature``.
    reward_scale: G-OPD's ``lam`` (1: no reference model); the backends' ``lam=``.
    beta:     JSD skew (kind ``jsd`` only, ``0 < beta < 1``).
    entropy:  also compute the entropy (and its gradient).
    impl:     a *decided* backend name (``_decide.backend_name``).
    chunk:    rows per chunk of the chunked fused-linear path (0: the budget, ``_chunks.fused_row_ranges``).
    s_scale, s_cap / t_scale, t_cap / r_scale, r_cap: the logit transform ``(scale, cap)`` of the
              student / teacher / reference (``backends``: ``x -> cap tanh(scale x / cap)``, or
              ``scale x`` with ``cap = 0``; before the temperature). Identity: ``1.0, 0.0``.
    """
    kind: str
    inv_temp: float
    reward_scale: float = 1.0
    beta: float = 0.5
    entropy: bool = False
    impl: str = "torch"
    chunk: int = 0
    s_scale: float = 1.0
    s_cap: float = 0.0
    t_scale: float = 1.0
    t_cap: float = 0.0
    r_scale: float = 1.0
    r_cap: float = 0.0

    @property
    def tf(self) -> tuple:
        """``(tf_s, tf_t, tf_r)``: each model's ``(scale, cap)`` (the backends' ``tf_*`` keywords)."""
        return (self.s_scale, self.s_cap), (self.t_scale, self.t_cap), (self.r_scale, self.r_cap)

    def _tf_kw(self, models=MODELS) -> dict:
        """``tf_s``/``tf_t``/``tf_r`` keywords of the given models."""
        return {f"tf_{m}": tf for m, tf in zip(MODELS, self.tf) if m in models}

    @property
    def grad_kind(self) -> str:
        """The backend kind whose gradient this row needs (``dA/da = q``: minus the
        ``logprob`` gradient of a target on no shard, see ``grad_inputs``)."""
        return "logprob" if self.kind == "log_normalizer" else self.kind

    def stats_kw(self, be) -> dict:
        """Keywords of ``row_stats`` / ``fused_row_stats`` (plus ``need=`` for backends that can
        skip columns, i.e. torch)."""
        kw = dict(inv_temp=self.inv_temp, lam=self.reward_scale, **self._tf_kw())
        if getattr(be, "ACCEPTS_NEED", False):
            kw["need"] = be.NEED["logprob+entropy" if self.grad_kind == "logprob" and self.entropy else self.grad_kind]
        return kw

    def jsd_kw(self) -> dict:
        """Keywords of ``jsd_sums`` / ``fused_jsd_sums``."""
        return dict(inv_temp=self.inv_temp, beta=self.beta, **self._tf_kw(("s", "t")))

    def grad_kw(self) -> dict:
        """Keywords of ``grad_logits`` / ``fused_grad``."""
        return dict(kind=self.grad_kind, inv_temp=self.inv_temp, lam=self.reward_scale, beta=self.beta,
                    with_entropy=self.entropy, **self._tf_kw())

    def grad_inputs(self, targets, g: torch.Tensor):
        """``(targets, g)`` for the gradient primitive: for ``log_normalizer``, targets on no
        shard (-1) and ``-g_main`` (``dA/da = q = -(onehot(none) - q)``)."""
        if self.kind != "log_normalizer":
            return targets, g
        return torch.full(g.shape[:1], -1, dtype=torch.long, device=g.device), torch.cat([-g[:, :1], g[:, 1:]], 1)


def transform_fields(tf_s=None, tf_t=None, tf_r=None) -> dict:
    """``RowSpec`` keyword fields of the three models' checked ``(scale, cap)`` pairs (None: identity)."""
    out = {}
    for m, tf in zip(MODELS, (tf_s, tf_t, tf_r)):
        if tf is not None:
            out[f"{m}_scale"], out[f"{m}_cap"] = float(tf[0]), float(tf[1])
    return out


ROW_SPEC_SCHEMA = ("str kind, float inv_temp, float reward_scale, float beta, bool entropy, str impl, int chunk, "
                   "float s_scale, float s_cap, float t_scale, float t_cap, float r_scale, float r_cap")
"""``RowSpec``'s fields as the trailing arguments of every custom op's schema."""
SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(RowSpec))
if ROW_SPEC_SCHEMA != ", ".join(f"{_SCHEMA_TYPES[getattr(f.type, '__name__', f.type)]} {f.name}"
                                for f in dataclasses.fields(RowSpec)):
    raise AssertionError("ROW_SPEC_SCHEMA and RowSpec's fields disagree")


def pad_grads(n_inputs: int, grads) -> tuple:
    """Gradients of the leading inputs, ``None`` for the rest of ``n_inputs``."""
    grads = tuple(grads)
    if len(grads) > n_inputs:
        raise AssertionError(f"{len(grads)} gradients for {n_inputs} inputs")
    return grads + (None,) * (n_inputs - len(grads))


class SpecOp:
    """A ``torch.library`` custom op ``name`` with ``schema``: ``(inputs..., ROW_SPEC_SCHEMA) -> ...``.

    ``impl`` and ``fake`` are called as ``fn(*inputs, spec)``. Call it as ``op(*inputs, spec=spec)``.
    """

    def __init__(self, name: str, schema: str, impl, fake):
        head, spec_args, _ = schema.partition(ROW_SPEC_SCHEMA)
        if not spec_args or not head.startswith("(") or not head.endswith(", "):
            raise ValueError(f"{name}: the schema must end its arguments with ROW_SPEC_SCHEMA: {schema}")
        self.n = head.count(",")
        self.op = torch.library.custom_op(name, self._unpacking(impl), mutates_args=(), schema=schema)
        self.op.register_fake(self._unpacking(fake))

    def _unpacking(self, fn):
        n = self.n
        return lambda *xs: fn(*xs[:n], RowSpec(*xs[n:]))

    def __call__(self, *inputs, spec: RowSpec):
        return self.op(*inputs, *(getattr(spec, f) for f in SPEC_FIELDS))

    def register_autograd(self, backward, setup_context) -> None:
        """``setup_context(ctx, inputs, spec, output)``; ``backward(ctx, *grad_outputs)`` returns
        the gradients of the leading inputs (the rest, spec fields included, get ``None``)."""
        n, total = self.n, self.n + len(SPEC_FIELDS)

        def setup(ctx, inputs, output):
            setup_context(ctx, inputs[:n], RowSpec(*inputs[n:]), output)

        self.op.register_autograd(lambda ctx, *gs: pad_grads(total, backward(ctx, *gs)), setup_context=setup)
