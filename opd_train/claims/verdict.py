"""What each claim measures per seed, and the verdict over seeds (`opd_train.claims`).

A claim turns one seed's runs into one number ``d`` whose sign it predicts (> 0 when the claim
holds). Two kinds:

* **accuracy** claims: ``d`` is a difference of held-out accuracies (points), e.g. final accuracy
  of OPD − SeqKD, or a prior-skill drop;
* **budget** claims, as the papers measure cost: the budget (FLOPs, generated tokens, samples,
  seconds: `opd_train.budget`) each of two runs spends to first reach a target accuracy at an
  evaluation, and ``d = log10(baseline's budget / the claimed method's)`` (> 0: the claimed method
  is cheaper; the table shows the ratio ``10^d``). A run that never reaches the target has no
  budget: the seed's cell says "not reached" (never a made-up number). If only the baseline
  misses it, the ratio against the baseline's whole budget is a lower bound (shown "≥").

The verdict over the seeds' numbers is a paired 95% interval: the seeds pair the runs (same seed,
same prompts), ``d`` is per seed, and the interval is ``mean ± t(0.975, n−1) · sd / √n`` (Student's
t, `T975`). It **holds** if the whole interval is above 0, **does not hold** if it is wholly below,
and is **inconclusive** otherwise (or with one seed). Budget claims with seeds that did not reach:
"does not hold" if no seed has a ratio and the claimed method missed the target where the baseline
reached it, otherwise "inconclusive" unless every seed has a ratio.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

# two-sided 95% Student-t quantiles t(0.975, df), df = 1..30 (standard tables); beyond 30 the df-30 value
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class Refs:
    """Accuracies (points) the claims compare against: the external teacher and each domain expert."""
    teacher: float
    experts: dict = field(default_factory=dict)  # domain -> the expert's accuracy on that domain


# -- per-run numbers --------------------------------------------------------------------------------
def evals(run: list[dict]) -> list[dict]:
    return [r for r in run if "eval_accuracy" in r]


def final(run: list[dict]) -> float:
    return 100 * evals(run)[-1]["eval_accuracy"]


def best(run: list[dict]) -> float:
    return max(100 * r["eval_accuracy"] for r in evals(run))


def gain(run: list[dict]) -> float:
    ev = evals(run)
    return 100 * (ev[-1]["eval_accuracy"] - ev[0]["eval_accuracy"])


def prior_drop(run: list[dict]) -> float:
    """How much of the prior skill was lost (points): prior accuracy at the start − at the end."""
    ev = evals(run)
    return 100 * (ev[0]["prior_accuracy"] - ev[-1]["prior_accuracy"])


def worst_domain_margin(run: list[dict], experts: dict) -> float:
    """min over domains of the student's final accuracy there − that domain's expert's (points)."""
    by = evals(run)[-1]["eval_accuracy_by_domain"]
    return min(100 * by[d] - acc for d, acc in experts.items())


def spent(row: dict, budget: str) -> float:
    """A budget of an evaluation row: a logged key (`opd_train.budget`), or ``flops-teacher_sample``
    (the FLOPs without the teacher's sampling)."""
    if budget == "flops-teacher_sample":
        return row["flops"] - row["flops_teacher_sample"]
    return row[budget]


def to_reach(run: list[dict], target: float, budget: str) -> float | None:
    """The budget at the first evaluation with accuracy >= ``target`` (points), or None if none."""
    hit = next((r for r in evals(run) if 100 * r["eval_accuracy"] >= target - 1e-9), None)
    return None if hit is None else spent(hit, budget)


@dataclass(frozen=True)
class Reach:
    """One seed of a budget claim: ``d = log10(base / claimed)`` or None, and its cell text."""
    d: float | None
    text: str
    claimed_missed: bool = False


def ratio(claimed: list[dict], base: list[dict], target: float, budget: str) -> Reach:
    c, b = to_reach(claimed, target, budget), to_reach(base, target, budget)
    if c is None:
        return Reach(None, "not reached" if b is not None else "neither reached", claimed_missed=b is not None)
    if c <= 0:  # reached before training: no ratio to speak of
        return Reach(None, "reached at start")
    if b is None:
        whole = spent(evals(base)[-1], budget)
        return Reach(math.log10(whole / c), f"≥ {whole / c:.3g}× (baseline not reached)")
    if b <= 0:
        return Reach(None, "baseline reached at start", claimed_missed=True)
    return Reach(math.log10(b / c), f"{b / c:.3g}×")


# -- the verdict --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    mean: float | None
    low: float | None          # the 95% interval (None: fewer than 2 seeds with a number)
    high: float | None
    text: str                  # holds / does not hold / inconclusive (...)


def t975(df: int) -> float:
    return T975[min(df, len(T975)) - 1]


def interval(values: list[float]) -> tuple[float, float, float] | None:
    """(mean, low, high): the paired 95% t interval of the mean; None for fewer than 2 values."""
    if len(values) < 2:
        return None
    m = statistics.fmean(values)
    half = t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def verdict(values: list) -> Verdict:
    """The verdict over one claim's per-seed numbers (floats, or `Reach` for budget claims)."""
    reach = [v for v in values if isinstance(v, Reach)]
    if reach:
        nums = [v.d for v in reach if v.d is not None]
        if len(nums) < len(reach):
            missed = sum(v.claimed_missed for v in reach)
            if not nums and missed:
                return Verdict(None, None, None, "does not hold (target not reached)")
            return Verdict(statistics.fmean(nums) if nums else None, None, None,
                           f"inconclusive (a budget ratio in {len(nums)} of {len(reach)} seeds)")
        values = nums
    iv = interval(values)
    if iv is None:
        return Verdict(values[0] if values else None, None, None, "inconclusive (one seed)")
    m, lo, hi = iv
    text = "holds" if lo > 0 else "does not hold" if hi < 0 else "inconclusive"
    return Verdict(m, lo, hi, text)


# -- the claims -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    text: str
    metric: str                 # what d is, with the paper's metric and axis
    runs: tuple[str, ...]       # RUNS it needs (the first: the claimed method)
    value: object = None        # (runs of one seed: name -> metric rows, Refs) -> d (float) or `Reach`
    regime: str = ""            # which regime of the paper's claim this row tests
    needs: str | None = None    # an asset beyond its runs' (`opd_train.claims.runs.ASSET_MISSING`)
    ratio: bool = False         # a budget claim: d = log10 of a budget ratio
    target: object = None       # budget claims: (runs, Refs) -> the target accuracy (points), for the noise column


TEACHER_CAPPED = "imperfect teacher (below GRPO's result on bench): distillation is capped by it"
STRONG = "teacher stronger than GRPO's result (the paper's regime)"
SELF = "self-teacher: the student with privileged context"


def _reach(claimed, base, budget, target):
    return lambda r, t: ratio(r[claimed], r[base], target(r, t), budget)


def _grpo_final(r, t):
    return final(r["grpo"])


def _grpo_best(r, t):
    return best(r["grpo"])


def _teacher95(r, t):
    return 0.95 * t.teacher


CLAIMS = [
    Claim("OPD reaches RL's accuracy at a fraction of the compute (Qwen3 report, Table 21; Thinking Machines)",
          "FLOPs to reach GRPO's final acc., GRPO / OPD (ratio; paper: ~10×)", ("opd-strong", "grpo"),
          _reach("opd-strong", "grpo", "flops", _grpo_final), STRONG, ratio=True, target=_grpo_final),
    Claim("OPD is cheaper than off-policy distillation (Thinking Machines: 9-30×)",
          "FLOPs to reach 95% of the teacher's acc., SeqKD / OPD, teacher's sampling counted (ratio)",
          ("opd", "seqkd"), _reach("opd", "seqkd", "flops", _teacher95), TEACHER_CAPPED, ratio=True,
          target=_teacher95),
    Claim("OPD is cheaper than off-policy distillation, without the teacher's sampling cost",
          "FLOPs to reach 95% of the teacher's acc., SeqKD / OPD, teacher's sampling not counted (ratio)",
          ("opd", "seqkd"), _reach("opd", "seqkd", "flops-teacher_sample", _teacher95), TEACHER_CAPPED,
          ratio=True, target=_teacher95),
    Claim("OPD beats off-policy distillation at equal samples", "final acc. OPD − SeqKD (points)",
          ("opd", "seqkd"), lambda r, t: final(r["opd"]) - final(r["seqkd"]), TEACHER_CAPPED),
    Claim("OPSD needs fewer generated tokens than GRPO (OPSD repo: 8-12×)",
          "generated tokens to reach GRPO's final acc., GRPO / OPSD (ratio)", ("opsd", "grpo"),
          _reach("opsd", "grpo", "generated_tokens", _grpo_final), SELF, ratio=True, target=_grpo_final),
    Claim("SDPO reaches GRPO's best accuracy in fewer attempts (SDPO paper)",
          "samples to reach GRPO's best acc., GRPO / SDPO frozen teacher (ratio)", ("sdpo-frozen", "grpo"),
          _reach("sdpo-frozen", "grpo", "samples", _grpo_best), SELF, ratio=True, target=_grpo_best),
    Claim("SDPO reaches GRPO's best accuracy in less wall-clock time (SDPO paper)",
          "training seconds to reach GRPO's best acc., GRPO / SDPO frozen teacher (ratio; shared CPU)",
          ("sdpo-frozen", "grpo"), _reach("sdpo-frozen", "grpo", "time_s", _grpo_best), SELF, ratio=True,
          target=_grpo_best),
    Claim("SDPO with the paper's EMA teacher reaches GRPO's best in fewer attempts",
          "samples to reach GRPO's best acc., GRPO / SDPO EMA teacher (ratio)", ("sdpo", "grpo"),
          _reach("sdpo", "grpo", "samples", _grpo_best), SELF + "; the paper's EMA teacher", ratio=True,
          target=_grpo_best),
    Claim("SDFT learns the new skill with less forgetting than SFT",
          "prior-skill acc. drop, SFT − SDFT EMA (points)", ("sdft", "sft"),
          lambda r, t: prior_drop(r["sft"]) - prior_drop(r["sdft"]), SELF + "; the paper's EMA teacher",
          needs="prior"),
    Claim("SDFT (frozen teacher) learns the new skill with less forgetting than SFT",
          "prior-skill acc. drop, SFT − SDFT frozen (points)", ("sdft-frozen", "sft"),
          lambda r, t: prior_drop(r["sft"]) - prior_drop(r["sdft-frozen"]), SELF, needs="prior"),
    Claim("ExOPD >= OPD (λ = 1.25)", "final acc. G-OPD λ=1.25 − λ=1 (points)", ("gopd-1.25", "gopd-1"),
          lambda r, t: final(r["gopd-1.25"]) - final(r["gopd-1"]), TEACHER_CAPPED),
    Claim("ExOPD >= OPD (λ = 2)", "final acc. G-OPD λ=2 − λ=1 (points)", ("gopd-2", "gopd-1"),
          lambda r, t: final(r["gopd-2"]) - final(r["gopd-1"]), TEACHER_CAPPED),
    Claim("ExOPD can exceed an imperfect teacher", "final acc. G-OPD λ=1.25 − the teacher's (points)",
          ("gopd-1.25",), lambda r, t: final(r["gopd-1.25"]) - t.teacher, TEACHER_CAPPED),
    Claim("reward correction with the teacher's base helps",
          "final acc. G-OPD λ=1.25 ref=teacher base − ref=student init (points)", ("gopd-1.25-base", "gopd-1.25"),
          lambda r, t: final(r["gopd-1.25-base"]) - final(r["gopd-1.25"]), "RL-trained teacher with its base kept"),
    Claim("a multi-teacher student >= each expert on its domain",
          "per-domain acc. of the G-OPD λ=1.25 student − the expert's, worst domain (points)", ("multi-1.25",),
          lambda r, t: worst_domain_margin(r["multi-1.25"], t.experts), "two domain experts"),
    Claim("entropy-aware OPD beats OPD (arXiv 2603.07079: +1.4 to +5.1 pass@8)",
          "final acc. entropy-aware OPD − OPD (points; greedy pass@1, not pass@8)", ("eopd", "opd"),
          lambda r, t: final(r["eopd"]) - final(r["opd"]), TEACHER_CAPPED),
    Claim("IW-OPD beats OPD (arXiv 2606.22600)", "final acc. IW-OPD − OPD (points)", ("iwopd", "opd"),
          lambda r, t: final(r["iwopd"]) - final(r["opd"]), TEACHER_CAPPED),
    Claim("student-top-k reverse KL distils as well as OPD (verl #6676, NeMo-RL #3584)",
          "final acc. student-top-k reverse KL − OPD (points)", ("topk-rkl", "opd"),
          lambda r, t: final(r["topk-rkl"]) - final(r["opd"]), TEACHER_CAPPED),
]
