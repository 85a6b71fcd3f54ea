"""The rows of the quality tables, as data: each a mergekit method with fixed settings."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from mergekit_lrp.merging.methods.lrp import DEFAULTS as LRP_DEFAULTS
from mergekit_lrp.merging.selection import default_epsilon

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
    #: score-set key (harness.score_sets): "[<signal>:]<target>-<n prompts>",
    #: "gram-<token weighting>-<n prompts>" (a Gram file), or "random-{seed}"
    scores: str | None = None
    uses_density: bool = True
    uses_weight: bool = True  # circuit takes no per-model weight (priority decides)
    #: lrp rows name their rule on top of PLAIN_LRP, so they keep their meaning when lrp's
    #: defaults change; "lrp (defaults)" alone runs whatever the defaults are
    pinned: bool = True
    role: str = REFERENCE
    #: merge every rotation of the experts' list, not only the listed order: True for the
    #: rules whose result depends on the order (None: decided by :func:`depends_on_order`)
    rotations: bool | None = None
    #: rank every entry exactly (a sort) in stochastic selection, whatever the tensor's
    #: size: the reference for lrp's approximate ranks (harness.merge.exact_ranks)
    exact_ranks: bool = False
    #: hold the base: the base's own file of the row's score kind as ``base_scores``, at
    #: this ``base_weight`` (None: no base file; ``harness.score_sets.base_score_file``)
    base_weight: float | None = None


def _rows(role: str, *methods: Method) -> list[Method]:
    return [replace(method, role=role) for method in methods]


DEFAULT_SCORES = "predicted-128"


def gram_scores(weighting: str = "none") -> str:
    """The score-set key of Gram files (RegMean statistics) on the experts' 128
    calibration texts, tokens weighted by ``weighting`` (lrp-compute --method gram)."""
    return f"gram-{weighting}-128"


#: lrp's rules before the merge-rules issue chose new defaults: per-tensor top-k, the
#: weighted kept deltas added
PLAIN_LRP = {"selection": "topk", "consensus": "none", "normalize": False}
METHODS = [
    *_rows(
        LRP,
        # every parameter at lrp's default, the weight included (1: no sweep)
        Method(
            "lrp (defaults)",
            "lrp",
            scores=DEFAULT_SCORES,
            seeds=(0, 1, 2) if LRP_DEFAULTS.selection == "stochastic" else (None,),
            pinned=False,
            uses_weight=False,
        ),
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
#: published data-free merges mergekit lacks (the bench's own methods, ``peers``): each
#: at its paper's setting (α 1: every model's weight 1) and at the weight chosen on the
#: validation split; WUDI's closed form has no scale (equal weights cancel)
PEERS = [
    Method("tsv_m (α 1)", "tsv_m", uses_density=False, uses_weight=False),
    Method("tsv_m", "tsv_m", uses_density=False),
    Method("iso_c (α 1)", "iso_c", uses_density=False, uses_weight=False),
    Method("iso_c", "iso_c", uses_density=False),
    Method("wudi", "wudi", uses_density=False, uses_weight=False),
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
#: earlier rules of lrp, each one change on top of plain top-k (--variants)
OLDER_RULES = _rows(
    LRP_VARIANT,
    *(
        Method(f"lrp (delta, consensus {c})", "lrp", {"consensus": c}, scores=DEFAULT_SCORES)
        for c in ("relevance", "winner", "drop")
    ),
    Method("lrp (delta, rescale mass)", "lrp", {"rescale": "mass"}, scores=DEFAULT_SCORES),
    *(
        Method(f"lrp (delta, {b} budget)", "lrp", {"budget": b}, scores=DEFAULT_SCORES)
        for b in ("layer", "model")
    ),
    Method("lrp (delta, priority)", "lrp", {"consensus": "priority"}, scores=DEFAULT_SCORES),
    Method(
        "lrp (delta, stochastic, priority)",
        "lrp",
        {"selection": "stochastic", "consensus": "priority"},
        scores=DEFAULT_SCORES,
        seeds=(0, 1, 2),
    ),
)


def _rule(selection: str, consensus: str, **extra) -> Method:
    """lrp with ``selection`` and ``consensus`` and the disjoint mean (``normalize``)."""
    label = f"{consensus}, |delta| mass" if extra.get("unit_mass") == "magnitude" else consensus
    return Method(
        f"lrp (delta, {selection}, {label}, normalize)",
        "lrp",
        {"selection": selection, "consensus": consensus, "normalize": True, **extra},
        scores=DEFAULT_SCORES,
        seeds=(0, 1, 2) if selection == "stochastic" else (None,),
    )


#: the rules lrp's defaults are chosen among (docs/BENCHMARKS.md): selection by rank
#: (stochastic) or top-k, and how sign conflicts between the experts are resolved: by the
#: list order (priority), per output unit by relevance or |delta| mass (unit), by TIES'
#: election (sum) or entry by entry to the most important (winner); and Circuit-Merge
RULES = [
    *_rows(
        LRP_VARIANT,
        *(_rule("stochastic", c) for c in ("priority", "unit", "sum", "winner")),
        _rule("stochastic", "unit", unit_mass="magnitude"),
        *(_rule("topk", c) for c in ("priority", "unit", "sum")),
        _rule("topk", "unit", unit_mass="magnitude"),
        Method(
            "lrp (delta, stochastic)",
            "lrp",
            {"selection": "stochastic"},
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
#: lrp's stochastic selection (the defaults before the many-expert families) with
#: approximate ranks (as merged) and with exact ranks, both in the listed order over three
#: merge seeds, so the seed-to-seed spread of the exact version is what the approximation
#: is compared with (quality_report.ranks_table)
RANK_CHECK = _rows(
    LRP_VARIANT,
    *(
        Method(
            f"lrp (stochastic, listed order{', exact ranks' if exact else ''})",
            "lrp",
            {"importance": "delta", "selection": "stochastic", "consensus": "priority",
             "normalize": True},
            scores=DEFAULT_SCORES,
            seeds=(0, 1, 2),
            pinned=False,
            rotations=False,
            exact_ranks=exact,
        )
        for exact in (False, True)
    ),
)
#: where Circuit-Merge's results come from: its combination without any drops, drops
#: without the 1/p rescale or at one rate for every model (temperature 1), and drops that
#: differ by rank
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
        "circuit (no rescale)",
        "circuit",
        {"rescale": False},
        seeds=(0, 1, 2),
        uses_density=False,
        uses_weight=False,
    ),
    Method(
        "circuit (temperature 1)",
        "circuit",
        {"temperature": 1.0},
        seeds=(0, 1, 2),
        uses_density=False,
        uses_weight=False,
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
    # theta^2 x mean squared input: Wanda's pruning score (squared), no relevance
    Method(
        "activation (weight)", "lrp", {"importance": "weight"}, scores="activation:predicted-128"
    ),
    Method("attnlrp (delta)", "lrp", {"importance": "delta"}, scores=DEFAULT_SCORES),
    Method("attnlrp (weight)", "lrp", {"importance": "weight"}, scores=DEFAULT_SCORES),
    Method("attnlrp next-token (delta)", "lrp", {"importance": "delta"}, scores="next-token-128"),
    # mergekit's DARE drop without its 1/density rescale, nothing normalized: what the
    # random top-k row does with a Bernoulli draw instead of an exact half
    Method(
        "dare_linear, no rescale",
        "dare_linear",
        {"rescale": False, "normalize": False},
        seeds=(0, 1, 2),
    ),
    # the exact OBS saliency delta^2 / [(G + lambda I)^-1]_jj from the full Gram matrix
    # (activation uses its diagonal only)
    Method("gram OBS (delta)", "lrp", {"importance": "delta"}, scores=gram_scores()),
]


def _regmean(alpha: float, other: str, ridge: float | None = None, tokens: str = "none"):
    return Method(
        f"regmean (alpha {alpha}, {other.replace('_', ' ')}"
        + (f", ridge {ridge:g}" if ridge is not None else "")
        + (f", tokens {tokens}" if tokens != "none" else "")
        + ")",
        "regmean",
        {
            "alpha": alpha,
            "other_tensors": other,
            **({"ridge": ridge} if ridge is not None else {}),
        },
        scores=gram_scores(tokens),
        uses_density=False,
        uses_weight=other == "task_arithmetic",
    )


#: RegMean from Gram files: alpha (the off-diagonal scale), the rule for the tensors it
#: does not solve, the ridge, on plain Gram files (every token weighted 1); then the
#: token weighting of the Gram files at the defaults (the plain one is "regmean (alpha
#: 0.9, average)"). A model's weight scales its Gram matrices, which changes nothing when
#: all are equal, so it is swept only where task arithmetic uses it
REGMEAN = [
    *(
        _regmean(alpha, other, ridge)
        for alpha, other, ridge in [
            *((a, o, None) for o in ("average", "task_arithmetic") for a in (0.0, 0.5, 0.9, 1.0)),
            (0.9, "average", 0.0),
            (0.9, "average", 0.01),
            (1.0, "average", 0.01),
        ]
    ),
    *(_regmean(0.9, "average", tokens=tokens) for tokens in ("answer", "relevance", "gradient")),
]
#: every row by its table name
ALL_ROWS = (
    METHODS
    + VARIANTS
    + OLDER_RULES
    + RULES
    + CIRCUIT_PARTS
    + RANK_CHECK
    + ABLATION
    + REGMEAN
    + PEERS
)
BY_NAME = {m.name: m for m in ALL_ROWS}
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
        methods += VARIANTS + OLDER_RULES
    if rules and not quick:
        methods += RULES + CIRCUIT_PARTS + RANK_CHECK
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


def depends_on_order(method: Method) -> bool:
    """Whether a row's result depends on the order the experts are listed in: Circuit-Merge
    (priority by position) and lrp with ``consensus: priority`` (lrp's own default where
    the row does not set it)."""
    if method.rotations is not None:
        return method.rotations
    if method.merge_method == "circuit":
        return True
    if method.merge_method != "lrp":
        return False
    return lrp_rule(method).get("consensus", lrp_default("consensus")) == "priority"


def lrp_default(name: str):
    """The default of the lrp merge method's global parameter ``name``."""
    return getattr(LRP_DEFAULTS, name)


def orders_of(subset: tuple, method: Method) -> list[tuple]:
    """The lists a row merges ``subset`` in: every rotation for an order-dependent rule
    (:func:`depends_on_order`), else the listed order."""
    listed = tuple(subset)
    if not depends_on_order(method):
        return [listed]
    return [listed[i:] + listed[:i] for i in range(len(listed))]


def weights_for(subset, method: Method) -> list[float]:
    """The per-model weights swept on the validation split: {1/N, 0.5, 1}; one (1) for a
    method without weights, and for a row that normalizes (:func:`normalizes`), where
    equal weights cancel (every entry is divided by the summed weights of the models that
    kept it)."""
    if not method.uses_weight or normalizes(method):
        return [1.0]
    return sorted({round(1 / len(subset), 4), 0.5, 1.0})


def normalizes(method: Method) -> bool:
    """Whether the row divides by the summed weights (lrp's rule, or a mergekit row that
    sets ``normalize`` itself), so that equal weights cancel."""
    if method.merge_method != "lrp":
        return bool(method.params.get("normalize", False))
    return bool(lrp_rule(method).get("normalize", lrp_default("normalize")))


def lrp_rule(method: Method) -> dict:
    """The lrp parameters a row sets at every density (pinned rows on plain top-k)."""
    return {**PLAIN_LRP, **method.params} if method.pinned else dict(method.params)


def runs_of(subset: tuple, method: Method) -> list[tuple]:
    """(merge seed, list order) of every merge of one cell at one weight: each seed in the
    listed order for an order-free rule; each rotation at the first seed for an
    order-dependent one, so that the spread over orders is the order's alone (a model's
    draw does not depend on its place in the list)."""
    orders = orders_of(subset, method)
    if len(orders) == 1:
        return [(seed, orders[0]) for seed in method.seeds]
    return [(method.seeds[0], order) for order in orders]


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
        if params.get("selection") == "stochastic" and method.pinned:  # lrp's own spread
            params["epsilon"] = default_epsilon(density)
    return params, per_model


def merge_config(family, order, method: Method, density, weight, score_files, seed=None) -> dict:
    """The mergekit configuration of one merge of ``family``'s experts listed in ``order``
    (:func:`orders_of`); ``score_files``: (score-set key, task) -> file."""
    shared, per_model = method_parameters(method, density)
    models = []
    for task in order:
        params = {"weight": weight, **per_model} if method.uses_weight else dict(per_model)
        if method.scores:
            params["lrp_scores"] = str(score_files[(method.scores.format(seed=seed), task)])
        models.append({"model": str(family.experts[task]), "parameters": params})
    if method.base_weight is not None:
        shared["base_scores"] = str(score_files[(method.scores, "base")])
        shared["base_weight"] = method.base_weight
    return {
        "merge_method": method.merge_method,
        "base_model": str(family.base),
        "parameters": shared,
        "models": models,
        "dtype": "float32",
    }
