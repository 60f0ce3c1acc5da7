"""The routing policy and the decision function: which route serves a request.

A policy is an ordered list of rules. Each rule has conditions on the
request's features (all must hold) and an action (a route, with parameters);
the first rule that matches wins, and ``default`` takes the rest. Before the
rules, a client may ask for a route itself (header ``x-tandem-route`` or a model
suffix) when the policy allows it; after them, the tenant's cloud budget and the
edge's load may still move the request (``budget``, ``fallbacks``).

The decision is a pure function of the policy and the features, so it can be
tested and explained (``explain``) without any I/O. The YAML form is the
pydantic model's JSON form; validation errors name the field (``rules.2.when``).
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from router.errors import PolicyError

Route = Literal["edge", "cloud", "speculative"]
ROUTES: tuple[Route, ...] = ("edge", "cloud", "speculative")
CLOUD_SUFFIX = "@cloud"
EDGE_SUFFIX = "@edge"
SPECULATIVE_SUFFIX = "@speculative"
_SUFFIXES: dict[str, Route] = {
    CLOUD_SUFFIX: "cloud",
    EDGE_SUFFIX: "edge",
    SPECULATIVE_SUFFIX: "speculative",
}

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Count = Annotated[int, Field(ge=0)]
ToolChoice = Literal["auto", "none", "required", "named"]
ResponseFormat = Literal["text", "json_object", "json_schema"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Conditions(_Strict):
    """Conditions on a request's features; a rule matches when all given ones hold.

    ``*_at_least`` is inclusive, ``*_below`` exclusive, so adjacent rules can
    split a range without overlap. Lists match any of their entries; model and
    tenant entries are shell patterns (``gpt-*``).
    """

    has_tools: bool | None = Field(default=None, description="the request offers tools")
    tool_choice: list[ToolChoice] | None = None
    turn_depth_at_least: Count | None = Field(default=None, description="user turns so far")
    turn_depth_below: Count | None = None
    prompt_tokens_at_least: Count | None = None
    prompt_tokens_below: Count | None = None
    max_tokens_at_least: Count | None = Field(default=None, description="the requested max_tokens")
    max_tokens_below: Count | None = None
    response_format: list[ResponseFormat] | None = None
    model: list[str] | None = Field(default=None, description="requested model name patterns")
    tenant: list[str] | None = Field(default=None, description="tenant patterns (x-tandem-tenant)")
    complexity_at_least: Fraction | None = Field(
        default=None,
        description="the learned classifier's score: P(the edge's answer is not the cloud's)",
    )
    complexity_below: Fraction | None = None
    edge_queue_at_least: Count | None = Field(
        default=None, description="requests waiting on this edge"
    )
    edge_queue_below: Count | None = None
    cloud_workers_at_least: Count | None = Field(default=None, description="healthy cloud workers")
    cloud_workers_below: Count | None = None
    cloud_latency_ms_at_least: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="recent median time to first token of the cloud route, seen here"
    )
    cloud_latency_ms_below: Annotated[float, Field(ge=0)] | None = None
    speculative_acceptance_at_least: Fraction | None = Field(
        default=None, description="observed draft acceptance for the request's category"
    )
    speculative_acceptance_below: Fraction | None = None


class Rule(_Strict):
    """One routing rule: when all conditions hold, take this route."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=64)
    description: str = ""
    when: Conditions = Field(default_factory=lambda: Conditions())
    route: Route
    max_draft_tokens: Annotated[int, Field(ge=1, le=64)] | None = Field(
        default=None, description="speculative only: the longest draft per verification"
    )
    escalate: bool = Field(default=True, description="edge only: allow mid-answer escalation")

    @model_validator(mode="after")
    def _parameters_fit_the_route(self) -> Rule:
        if self.max_draft_tokens is not None and self.route != "speculative":
            raise ValueError("max_draft_tokens applies to route 'speculative' only")
        return self


class Default(_Strict):
    """The route of requests no rule matched."""

    route: Route = "edge"


class EdgeOverloaded(_Strict):
    """Send edge-bound requests elsewhere while this edge's queue is long, or while the
    estimated wait in it would break the TTFT target (``slo.ttft_p95_ms``)."""

    queue_at_least: Annotated[int, Field(ge=1)] = 8
    route: Literal["cloud", "speculative"] = "cloud"


class Fallbacks(_Strict):
    """What happens when the chosen route cannot serve."""

    cloud_unavailable: Literal["edge", "fail"] = Field(
        default="edge",
        description="no cloud worker: serve on the edge (marked edge-fallback) or 503",
    )
    edge_overloaded: EdgeOverloaded | None = Field(
        default_factory=lambda: EdgeOverloaded(), description="null: always queue on the edge"
    )


class Escalation(_Strict):
    """Mid-answer escalation: hand an edge answer to a stronger route when unsure."""

    enabled: bool = False
    window_tokens: Annotated[int, Field(ge=1, le=256)] = 8
    min_mean_logprob: Annotated[float, Field(le=0)] = Field(
        default=-2.5, description="escalate when the mean logprob of the last window falls below"
    )
    after_tokens: Count = Field(default=0, description="do not escalate before this many tokens")
    route: Literal["cloud", "speculative"] = "speculative"


class Slo(_Strict):
    """Service-level targets the router steers by."""

    ttft_p95_ms: Annotated[float, Field(gt=0)] | None = Field(
        default=None,
        description="an edge whose estimated queue wait exceeds this counts as overloaded",
    )
    itl_p95_ms: Annotated[float, Field(gt=0)] | None = Field(
        default=None,
        description="inter-token latency the cloud fleet is sized for (the planner's target)",
    )


class UncachedThreshold(_Strict):
    """Ask for a remote prefill when at least this many prompt tokens are not cached."""

    uncached_tokens_at_least: Annotated[int, Field(ge=1)] = 512


class Disaggregation(_Strict):
    """Decode-role cloud workers (``tandem cloud serve --role decode``): when a request's
    prompt is prefilled by the prefill pool instead of the decode worker itself.

    Followed live by every decode worker (edges ignore it). ``always``, ``never``, or
    ``{uncached_tokens_at_least: N}``: the uncached tokens are the prompt's minus those
    the decode worker's own prefix cache holds (its estimate, ``cloud.disaggregation``),
    as llm-d's router decides.
    """

    remote_prefill: Literal["always", "never"] | UncachedThreshold = Field(
        default_factory=lambda: UncachedThreshold(),
        description="always | never | {uncached_tokens_at_least: N}",
    )

    def wants_remote_prefill(self, prompt_tokens: int, cached_tokens: int) -> bool:
        """Whether a prompt of ``prompt_tokens``, ``cached_tokens`` of them already in the
        decode worker's cache, should be prefilled by a prefill worker."""
        rule = self.remote_prefill
        if isinstance(rule, UncachedThreshold):
            return prompt_tokens - cached_tokens >= rule.uncached_tokens_at_least
        return rule == "always"


class Budget(_Strict):
    """A tenant's cloud tokens per hour (prompt + completion), counted on each edge."""

    tenant: str = Field(description="tenant pattern")
    cloud_tokens_per_hour: Count
    over_budget: Literal["edge", "fail"] = "edge"


def _default_rules() -> list[Rule]:
    return [
        Rule.model_validate(
            {"name": "tools", "description": "tool calling needs the stronger model",
             "when": {"has_tools": True}, "route": "cloud"}
        ),
        Rule.model_validate(
            {"name": "long-context", "description": "long prompts are slow on the edge",
             "when": {"prompt_tokens_at_least": 1024}, "route": "cloud"}
        ),
    ]  # fmt: skip


class RoutingPolicy(_Strict):
    """Where requests run: ordered rules, a default, fallbacks, escalation, SLOs, budgets."""

    version: Literal[1] = 1
    client_overrides: bool = Field(
        default=True, description="honour x-tandem-route and '<model>@edge|@cloud|@speculative'"
    )
    cloud_aliases: list[str] = Field(
        default_factory=lambda: ["tandem-cloud"],
        description=f"model names that ask for the cloud (also any '<model>{CLOUD_SUFFIX}')",
    )
    rules: list[Rule] = Field(default_factory=_default_rules)
    default: Default = Field(default_factory=lambda: Default())
    fallbacks: Fallbacks = Field(default_factory=lambda: Fallbacks())
    escalation: Escalation = Field(default_factory=lambda: Escalation())
    slo: Slo = Field(default_factory=lambda: Slo())
    budgets: list[Budget] = Field(default_factory=list)
    disaggregation: Disaggregation = Field(default_factory=lambda: Disaggregation())

    @model_validator(mode="after")
    def _rule_names_are_unique(self) -> RoutingPolicy:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"two rules are named {rule.name!r}; rule names must be unique")
            seen.add(rule.name)
        return self

    @property
    def uses_complexity(self) -> bool:
        """Whether any rule reads the classifier's score (so it is worth computing)."""
        return any(
            r.when.complexity_at_least is not None or r.when.complexity_below is not None
            for r in self.rules
        )

    def budget_for(self, tenant: str) -> Budget | None:
        """The first budget whose pattern matches the tenant."""
        return next((b for b in self.budgets if fnmatch.fnmatchcase(tenant, b.tenant)), None)

    # -- YAML form ------------------------------------------------------------

    def to_yaml(self) -> str:
        """The YAML form; unset rule conditions and parameters are left out to keep it short."""
        data = self.model_dump(mode="json")
        for rule in data["rules"]:
            rule["when"] = {k: v for k, v in rule["when"].items() if v is not None}
            if rule["max_draft_tokens"] is None:
                del rule["max_draft_tokens"]
        return yaml.safe_dump(data, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> RoutingPolicy:
        """Parse and validate; raises PolicyError with a message per bad field."""
        try:
            data = load_yaml(text)
        except yaml.YAMLError as exc:
            raise PolicyError(f"not valid YAML: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise PolicyError("a policy is a YAML mapping (rules:, default:, ...)")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise PolicyError(format_validation_error(exc)) from exc


MAX_YAML_DEPTH = 64  # far beyond any policy or config; far below Python's stack


class YamlTooDeepError(yaml.YAMLError):
    """A YAML document nested deeper than ``MAX_YAML_DEPTH``."""


def load_yaml(text: str) -> Any:
    """``yaml.safe_load``, refusing documents nested deeper than ``MAX_YAML_DEPTH``:
    PyYAML's composer recurses once per level, so a few thousand ``[`` raised
    RecursionError, not a YAML error. Its event parser is iterative, so the depth is
    measured on the events first."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise YamlTooDeepError(
                    f"the document is nested deeper than {MAX_YAML_DEPTH} levels"
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return yaml.safe_load(text)


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: ``rules.1.when.prompt_tokens_below: ...``."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(policy)"
        lines.append(f"{where}: {err['msg']}")
    return "\n".join(lines)


# -- request features ------------------------------------------------------------


@dataclass(frozen=True)
class RequestFeatures:
    """What the router looks at in a request, and the live state around it."""

    model: str
    has_tools: bool = False
    prompt_tokens: int = 0
    route_header: str | None = None  # x-tandem-route from the client
    tool_choice: ToolChoice | None = None
    turn_depth: int = 1
    max_tokens: int | None = None
    response_format: ResponseFormat = "text"
    tenant: str = "default"
    # Computed only when the policy reads it (it costs a classifier call).
    complexity: float | None = None
    edge_queue: int = 0
    edge_wait_ms: float | None = None  # estimated queue wait on this edge
    cloud_workers: int | None = None  # None: not on a mesh
    cloud_latency_ms: float | None = None
    speculative_acceptance: float | None = None
    cloud_tokens_used: int = 0  # by this tenant in the last hour, on this edge
    # The API key's fleet-wide cloud budget (tandem keys create --cloud-tokens-per-hour).
    key_cloud_budget: int | None = None
    key_over_budget: Literal["edge", "fail"] = "edge"
    fleet_cloud_tokens_used: int = 0  # by this tenant this UTC hour, on every edge


@dataclass(frozen=True)
class RouteDecision:
    """The chosen route, the rule that chose it, and the action's parameters."""

    route: Route
    rule: str
    reason: str
    max_draft_tokens: int | None = None
    escalate: bool = True
    fail_reason: str | None = None  # set when the policy says to refuse (budget: fail)


@dataclass(frozen=True)
class RuleTrace:
    """How one rule fared against a request (for ``explain``)."""

    rule: str
    matched: bool
    failed: list[str] = field(default_factory=list)  # the conditions that did not hold


@dataclass(frozen=True)
class Explanation:
    decision: RouteDecision
    trace: list[RuleTrace]


def base_model(model: str) -> str:
    """The served model name without a route suffix."""
    for suffix in _SUFFIXES:
        if model.endswith(suffix):
            return model[: -len(suffix)]
    return model


# Each condition: (field of Conditions, feature value, holds?). One table, so
# matching and explaining can never disagree.
def _checks(when: Conditions, f: RequestFeatures) -> list[tuple[str, Any, Callable[[Any], bool]]]:
    def at_least(v: Any, bound: float) -> bool:
        return v is not None and v >= bound

    def below(v: Any, bound: float) -> bool:
        return v is not None and v < bound

    c = when
    table: list[tuple[str, Any, Any, Callable[[Any, Any], bool]]] = [
        ("has_tools", f.has_tools, c.has_tools, lambda v, b: v == b),
        ("tool_choice", f.tool_choice, c.tool_choice, lambda v, b: v in b),
        ("turn_depth_at_least", f.turn_depth, c.turn_depth_at_least, at_least),
        ("turn_depth_below", f.turn_depth, c.turn_depth_below, below),
        ("prompt_tokens_at_least", f.prompt_tokens, c.prompt_tokens_at_least, at_least),
        ("prompt_tokens_below", f.prompt_tokens, c.prompt_tokens_below, below),
        ("max_tokens_at_least", f.max_tokens, c.max_tokens_at_least, at_least),
        ("max_tokens_below", f.max_tokens, c.max_tokens_below, below),
        ("response_format", f.response_format, c.response_format, lambda v, b: v in b),
        ("model", f.model, c.model, lambda v, b: any(fnmatch.fnmatchcase(v, p) for p in b)),
        ("tenant", f.tenant, c.tenant, lambda v, b: any(fnmatch.fnmatchcase(v, p) for p in b)),
        ("complexity_at_least", f.complexity, c.complexity_at_least, at_least),
        ("complexity_below", f.complexity, c.complexity_below, below),
        ("edge_queue_at_least", f.edge_queue, c.edge_queue_at_least, at_least),
        ("edge_queue_below", f.edge_queue, c.edge_queue_below, below),
        ("cloud_workers_at_least", f.cloud_workers, c.cloud_workers_at_least, at_least),
        ("cloud_workers_below", f.cloud_workers, c.cloud_workers_below, below),
        ("cloud_latency_ms_at_least", f.cloud_latency_ms, c.cloud_latency_ms_at_least, at_least),
        ("cloud_latency_ms_below", f.cloud_latency_ms, c.cloud_latency_ms_below, below),
        (
            "speculative_acceptance_at_least",
            f.speculative_acceptance,
            c.speculative_acceptance_at_least,
            at_least,
        ),
        (
            "speculative_acceptance_below",
            f.speculative_acceptance,
            c.speculative_acceptance_below,
            below,
        ),
    ]
    return [
        (name, value, functools.partial(_swap, test, bound))
        for name, value, bound, test in table
        if bound is not None
    ]


def _swap(test: Callable[[Any, Any], bool], bound: Any, value: Any) -> bool:
    return test(value, bound)


def _trace_rule(rule: Rule, f: RequestFeatures) -> RuleTrace:
    failed = []
    for name, value, holds in _checks(rule.when, f):
        if not holds(value):
            bound = getattr(rule.when, name)
            failed.append(f"{name}: {bound!r} (request: {value!r})")
    return RuleTrace(rule.name, not failed, failed)


def _client_choice(policy: RoutingPolicy, f: RequestFeatures) -> RouteDecision | None:
    if not policy.client_overrides:
        return None
    # The client chose: its answer stays where it asked (no mid-answer escalation).
    if f.route_header in ROUTES:
        route = cast(Route, f.route_header)
        return RouteDecision(route, "header", f"x-tandem-route: {route}", escalate=False)
    for suffix, route in _SUFFIXES.items():
        if f.model.endswith(suffix):
            return RouteDecision(
                route, "model-alias", f"model {f.model!r} asks for it", escalate=False
            )
    if f.model in policy.cloud_aliases:
        return RouteDecision(
            "cloud", "model-alias", f"model {f.model!r} is a cloud alias", escalate=False
        )
    return None


def _over_budget(
    policy: RoutingPolicy, f: RequestFeatures
) -> tuple[str, Literal["edge", "fail"]] | None:
    """Why the tenant may not use the cloud now, and what to do instead; None if it may.
    Two budgets: the policy's, counted on each edge, and the API key's, over the fleet."""
    budget = policy.budget_for(f.tenant)
    if budget is not None and f.cloud_tokens_used >= budget.cloud_tokens_per_hour:
        reason = (
            f"tenant {f.tenant!r} used {f.cloud_tokens_used} of "
            f"{budget.cloud_tokens_per_hour} cloud tokens this hour"
        )
        return reason, budget.over_budget
    if f.key_cloud_budget is not None and f.fleet_cloud_tokens_used >= f.key_cloud_budget:
        reason = (
            f"tenant {f.tenant!r} used {f.fleet_cloud_tokens_used} of its key's "
            f"{f.key_cloud_budget} cloud tokens this hour, over the fleet"
        )
        return reason, f.key_over_budget
    return None


def _after_rules(policy: RoutingPolicy, f: RequestFeatures, d: RouteDecision) -> RouteDecision:
    """Budgets and load can still move a rule's choice."""
    if d.route in ("cloud", "speculative") and (over := _over_budget(policy, f)) is not None:
        reason, action = over
        if action == "fail":
            return RouteDecision(d.route, "budget", reason, fail_reason=reason)
        return RouteDecision("edge", "budget", reason)
    overloaded = policy.fallbacks.edge_overloaded
    if (
        d.route != "edge"
        or d.rule in ("header", "model-alias")  # the client asked for the edge: it waits
        or overloaded is None
        or not f.cloud_workers
    ):
        return d
    if f.edge_queue >= overloaded.queue_at_least:
        reason = f"{f.edge_queue} requests wait on this edge (>= {overloaded.queue_at_least})"
        return RouteDecision(overloaded.route, "edge-overloaded", reason)
    target = policy.slo.ttft_p95_ms
    if target is not None and f.edge_wait_ms is not None and f.edge_wait_ms > target:
        reason = f"estimated edge wait {f.edge_wait_ms:.0f} ms > slo.ttft_p95_ms {target:.0f}"
        return RouteDecision(overloaded.route, "edge-overloaded", reason)
    return d


def explain(policy: RoutingPolicy, f: RequestFeatures) -> Explanation:
    """The decision and, for every rule tried, whether it matched and why not."""
    chosen = _client_choice(policy, f)
    trace: list[RuleTrace] = []
    if chosen is None:
        for rule in policy.rules:
            t = _trace_rule(rule, f)
            trace.append(t)
            if t.matched:
                held = ", ".join(n for n, _, _ in _checks(rule.when, f)) or "no conditions"
                chosen = RouteDecision(
                    rule.route,
                    rule.name,
                    rule.description or f"matched ({held})",
                    max_draft_tokens=rule.max_draft_tokens,
                    escalate=rule.escalate,
                )
                break
    if chosen is None:
        chosen = RouteDecision(policy.default.route, "default", "no rule matched")
    return Explanation(_after_rules(policy, f, chosen), trace)


def decide(policy: RoutingPolicy, f: RequestFeatures) -> RouteDecision:
    """Pick the route for a request; the first matching rule wins."""
    return explain(policy, f).decision
