"""The rows of the quality tables, as data: each a mergekit method with fixed settings."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

#: what a row is, which decides how it is drawn and what the validation-choice table does
#: with it: one of lrp's main rows (bold, on top), an lrp variant of one (bold, dashed),
#: Circuit-Merge, or a row lrp is measured against (mergekit's methods, the signal
#: ablation's rows; thin)
LRP, LRP_VARIANT, CIRCUIT, REFERENCE = "lrp", "lrp variant", "circuit", "reference"


@dataclass(frozen=True)
class Method:
    """One row of the table: a mergekit method and its fixed settings."""

    name: str
    merge_method: str
    params: dict = field(default_factory=dict)
    seeds: tuple = (None,)  # several for random methods
    #: score-set key for lrp: "[<signal>:]<target>-<n prompts>", or "random-{seed}"
    scores: str | None = None
    uses_density: bool = True
    uses_weight: bool = True  # circuit takes no per-model weight (priority decides)
    reversed_order: bool = False  # list the experts last task first (circuit's priority)
    #: lrp rows name their rule on top of PLAIN_LRP, so they keep their meaning when lrp's
    #: defaults change; "lrp (defaults)" alone runs whatever the defaults are
    pinned: bool = True
    role: str = REFERENCE


def _rows(role: str, *methods: Method) -> list[Method]:
    return [replace(method, role=role) for method in methods]


DEFAULT_SCORES = "predicted-128"
#: Gram files (RegMean statistics) on the experts' 128 calibration texts
GRAM_SCORES = "inputs-128"
#: lrp's rules before the merge-rules issue chose new defaults: per-tensor top-k, the
#: weighted kept deltas added
PLAIN_LRP = {"selection": "topk", "consensus": "none", "normalize": False}
METHODS = [
    *_rows(
        LRP,
        Method("lrp (defaults)", "lrp", scores=DEFAULT_SCORES, seeds=(0, 1, 2), pinned=False),
        Method("lrp (delta)", "lrp", {"importance": "delta"}, scores=DEFAULT_SCORES),
        Method("lrp (weight)", "lrp", {"importance": "weight"}, scores=DEFAULT_SCORES),
    ),
    Method("task_arithmetic", "task_arithmetic", uses_density=False),
    Method("ties", "ties"),
    Method("dare_ties", "dare_ties", seeds=(0, 1, 2)),
    Method("della", "della", seeds=(0, 1, 2)),
    Method("breadcrumbs_ties", "breadcrumbs_ties"),
    Method("sce", "sce"),
]
VARIANTS = _rows(  # the questions asked when lrp does not win, one row each
    LRP_VARIANT,
    Method(
        "lrp (delta, next-token target)", "lrp", {"importance": "delta"}, scores="next-token-128"
    ),
    Method(
        "lrp (delta, sign consensus)",
        "lrp",
        {"importance": "delta", "consensus": "sum"},
        scores=DEFAULT_SCORES,
    ),
    Method(
        "lrp (delta, 16 calibration prompts)", "lrp", {"importance": "delta"}, scores="predicted-16"
    ),
    Method(
        "lrp (delta, rescale)",
        "lrp",
        {"importance": "delta", "rescale": True},
        scores=DEFAULT_SCORES,
    ),
)
#: lrp's selection and sign rules and Circuit-Merge, each a row beside METHODS
RULES = [
    *_rows(
        LRP_VARIANT,
        *(
            Method(f"lrp (delta, consensus {c})", "lrp", {"consensus": c}, scores=DEFAULT_SCORES)
            for c in ("relevance", "winner", "drop")
        ),
        Method("lrp (delta, rescale mass)", "lrp", {"rescale": "mass"}, scores=DEFAULT_SCORES),
        Method(
            "lrp (delta, stochastic)",
            "lrp",
            {"selection": "stochastic"},
            scores=DEFAULT_SCORES,
            seeds=(0, 1, 2),
        ),
        *(
            Method(f"lrp (delta, {b} budget)", "lrp", {"budget": b}, scores=DEFAULT_SCORES)
            for b in ("layer", "model")
        ),
        *(  # TIES-style disjoint mean: agreeing kept entries averaged, lone ones kept whole
            Method(
                f"lrp (delta, {c}, normalize)",
                "lrp",
                {"consensus": c, "normalize": True},
                scores=DEFAULT_SCORES,
            )
            for c in ("sum", "winner")
        ),
        *(
            Method(
                f"lrp (delta, stochastic, {c}, normalize)",
                "lrp",
                {"selection": "stochastic", "consensus": c, "normalize": True},
                scores=DEFAULT_SCORES,
                seeds=(0, 1, 2),
            )
            for c in ("sum", "relevance", "winner")
        ),
        # Circuit-Merge's conflict rule (the first-listed model wins) inside lrp
        Method("lrp (delta, priority)", "lrp", {"consensus": "priority"}, scores=DEFAULT_SCORES),
        Method(
            "lrp (delta, priority, normalize)",
            "lrp",
            {"consensus": "priority", "normalize": True},
            scores=DEFAULT_SCORES,
        ),
        Method(
            "lrp (delta, stochastic, priority, normalize)",
            "lrp",
            {"selection": "stochastic", "consensus": "priority", "normalize": True},
            scores=DEFAULT_SCORES,
            seeds=(0, 1, 2),
        ),
        Method(
            "lrp (delta, stochastic, priority, normalize, reversed priority)",
            "lrp",
            {"selection": "stochastic", "consensus": "priority", "normalize": True},
            scores=DEFAULT_SCORES,
            seeds=(0, 1, 2),
            reversed_order=True,
        ),
        Method(
            "lrp (delta, stochastic, priority)",
            "lrp",
            {"selection": "stochastic", "consensus": "priority"},
            scores=DEFAULT_SCORES,
            seeds=(0, 1, 2),
        ),
    ),
    *_rows(
        CIRCUIT,
        Method(
            "circuit (|delta| order)",
            "circuit",
            seeds=(0, 1, 2),
            uses_density=False,
            uses_weight=False,
        ),
        Method(
            "circuit (score order)",
            "circuit",
            {"drop_order": "scores"},
            scores=DEFAULT_SCORES,
            seeds=(0, 1, 2),
            uses_density=False,
            uses_weight=False,
        ),
    ),
]
#: where Circuit-Merge's lead comes from: its combination without any drops, and the
#: other priority order
CIRCUIT_PARTS = _rows(
    CIRCUIT,
    Method(
        "circuit (no drops)",
        "circuit",
        {"base_droprate": 0.0},
        uses_density=False,
        uses_weight=False,
    ),
    Method(
        "circuit (reversed priority)",
        "circuit",
        seeds=(0, 1, 2),
        uses_density=False,
        uses_weight=False,
        reversed_order=True,
    ),
    Method(
        "circuit (no drops, reversed priority)",
        "circuit",
        {"base_droprate": 0.0},
        uses_density=False,
        uses_weight=False,
        reversed_order=True,
    ),
    *(  # drops ranked by |delta| or by relevance once the keep probabilities differ
        Method(
            f"circuit ({order} order, epsilon 0.2)",
            "circuit",
            {"epsilon": 0.2, **({"drop_order": "scores"} if order == "score" else {})},
            scores=DEFAULT_SCORES if order == "score" else None,
            seeds=(0, 1, 2),
            uses_density=False,
            uses_weight=False,
        )
        for order in ("|delta|", "score")
    ),
)
#: the signal ablation: the same lrp selection (per-tensor top-k, same densities and
#: weight sweep), only the importance signal changes
ABLATION = [
    Method(
        "random top-k", "lrp", {"importance": "scores"}, scores="random-{seed}", seeds=(0, 1, 2)
    ),
    Method("magnitude |delta|", "lrp", {"missing_scores": "magnitude"}),
    Method("gradient (delta)", "lrp", {"importance": "delta"}, scores="gradient:predicted-128"),
    Method("fisher (delta)", "lrp", {"importance": "delta"}, scores="fisher:predicted-128"),
    Method("activation (delta)", "lrp", {"importance": "delta"}, scores="activation:predicted-128"),
    Method("attnlrp (delta)", "lrp", {"importance": "delta"}, scores=DEFAULT_SCORES),
    Method("attnlrp (weight)", "lrp", {"importance": "weight"}, scores=DEFAULT_SCORES),
    Method("attnlrp next-token (delta)", "lrp", {"importance": "delta"}, scores="next-token-128"),
    # the exact OBS saliency delta^2 / [(G + lambda I)^-1]_jj from the full Gram matrix
    # (activation uses its diagonal only)
    Method("gram OBS (delta)", "lrp", {"importance": "delta"}, scores=f"gram:{GRAM_SCORES}"),
]
#: RegMean from Gram files: alpha (the off-diagonal scale), the rule for the tensors it
#: does not solve, the ridge; a model's weight scales its Gram matrices, which changes
#: nothing when all are equal, so it is swept only where task arithmetic uses it
REGMEAN = [
    Method(
        f"regmean (alpha {alpha}, {other.replace('_', ' ')}"
        + (f", ridge {ridge:g})" if ridge is not None else ")"),
        "regmean",
        {
            "alpha": alpha,
            "other_tensors": other,
            **({"ridge": ridge} if ridge is not None else {}),
        },
        scores=f"gram:{GRAM_SCORES}",
        uses_density=False,
        uses_weight=other == "task_arithmetic",
    )
    for alpha, other, ridge in [
        *((a, o, None) for o in ("average", "task_arithmetic") for a in (0.0, 0.5, 0.9, 1.0)),
        (0.9, "average", 0.0),
        (0.9, "average", 0.01),
        (1.0, "average", 0.01),
    ]
]
#: every row by its table name
BY_NAME = {m.name: m for m in METHODS + VARIANTS + RULES + CIRCUIT_PARTS + ABLATION + REGMEAN}
DENSITIES = (0.1, 0.3, 0.5, 0.7, 0.9)

QUICK_METHODS = {"lrp (defaults)", "task_arithmetic", "ties", "dare_ties"}
QUICK_DENSITIES = (0.5,)
QUICK_PROMPTS = 32


def select_methods(
    quick: bool = False,
    variants: bool = False,
    rules: bool = False,
    ablation: bool = False,
    names: list[str] | None = None,
    regmean: bool = False,
) -> list[Method]:
    """The rows a run merges, as the command line's options choose them (``names`` wins
    over the tables; ``quick`` keeps one merge seed and 32 calibration prompts)."""
    methods = [m for m in METHODS if not quick or m.name in QUICK_METHODS]
    if variants and not quick:
        methods += VARIANTS
    if rules and not quick:
        methods += RULES + CIRCUIT_PARTS
    if ablation:
        methods = list(ABLATION)
    if regmean:
        methods = list(REGMEAN) + [BY_NAME["task_arithmetic"]]
    if names:
        unknown = [name for name in names if name not in BY_NAME]
        if unknown:
            raise SystemExit(f"unknown --methods {unknown}; known: {sorted(BY_NAME)}")
        methods = [BY_NAME[name] for name in names]
    if quick:
        methods = [
            replace(
                m,
                seeds=m.seeds[:1],
                scores=m.scores and m.scores.replace("-128", f"-{QUICK_PROMPTS}"),
            )
            for m in methods
        ]
    return methods


def weights_for(subset, method: Method) -> list[float]:
    """The per-model weights swept on the validation split: {1/N, 0.5, 1} (one
    placeholder for a method without weights)."""
    if not method.uses_weight:
        return [1.0]
    return sorted({round(1 / len(subset), 4), 0.5, 1.0})


def method_parameters(method: Method, density: float | None) -> tuple[dict, dict]:
    """(global parameters, per-model parameters) of one merge."""
    per_model = {}
    params = dict(method.params)
    if method.merge_method == "lrp" and method.pinned:
        params = {**PLAIN_LRP, **params}
    if method.uses_density:
        if method.merge_method == "sce":
            return {"select_topk": density, **params}, per_model
        per_model["density"] = density
        if method.merge_method == "della":  # density +/- epsilon must stay inside (0, 1)
            per_model["epsilon"] = min(0.15, 0.5 * min(density, 1 - density))
        if params.get("selection") == "stochastic" and method.pinned:  # the same bound
            params["epsilon"] = min(0.1, 0.5 * min(density, 1 - density))
    return params, per_model


def merge_config(family, subset, method: Method, density, weight, score_files, seed=None) -> dict:
    """The mergekit configuration of one merge of ``subset``'s experts of ``family``;
    ``score_files``: (score-set key, task) -> file."""
    shared, per_model = method_parameters(method, density)
    models = []
    for task in reversed(subset) if method.reversed_order else subset:
        params = {"weight": weight, **per_model} if method.uses_weight else dict(per_model)
        if method.scores:
            params["lrp_scores"] = str(score_files[(method.scores.format(seed=seed), task)])
        models.append({"model": str(family.experts[task]), "parameters": params})
    return {
        "merge_method": method.merge_method,
        "base_model": str(family.base),
        "parameters": shared,
        "models": models,
        "dtype": "float32",
    }
