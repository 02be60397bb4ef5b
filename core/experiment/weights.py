"""Map one framework's weights onto another's model: by structure, with explicit overrides.

Each backend describes a user's model as its parameterized layers in the order
the forward pass calls them, each with its parameters' canonical role
("kernel", "bias", "scale", ...) and canonical shape (the layout changes,
Linear (out, in) vs Dense (in, out), conv OIHW vs HWIO, LayerNorm weight vs
scale, are the backends' business: ``backends/*/session.py``). So two
models map when their layer lists pair up in order and each pair's parameters
pair up by role and shape. Anything else is a ``MappingError`` that shows both
lists side by side; an explicit ``{target name: source name}`` mapping
overrides the structure for the names it gives.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from gradparity.errors import ConfigError

#: The order parameters of one layer are paired in (by role; "other" by position).
_ROLE_ORDER = ("kernel", "embedding", "scale", "bias", "mean", "var", "other")


class MappingError(ConfigError):
    """The weights of one model cannot be mapped onto another's without a guess (exit code 2)."""

    subject = "weight mapping"


@dataclass(frozen=True)
class Param:
    name: str
    role: str
    shape: tuple[int, ...]
    trainable: bool
    layer: str

    def describe(self) -> str:
        return f"{self.name} {self.role} {list(self.shape)}"


@dataclass(frozen=True)
class ModelLayout:
    """A backend's description of a user's model (the 'describe' case's info)."""

    backend: str
    layers: tuple[dict, ...]
    calls: tuple[tuple[str, str], ...]
    output_shape: tuple[int, ...]
    #: Containers that own no parameter but hold layers (a residual block): {"name", "type", "called",
    #: "layers": indices into ``layers`` of every parameterized layer inside, "members": the names of every
    #: module/layer inside that ``calls`` lists}; their outputs are localization checkpoints too.
    blocks: tuple[dict, ...] = ()

    @classmethod
    def from_info(cls, backend: str, info: dict) -> "ModelLayout":
        return cls(backend, tuple(info["layers"]), tuple(tuple(c) for c in info.get("calls", [])),
                   tuple(info.get("output_shape", ())), tuple(info.get("blocks", ())))

    def params(self, layer: dict) -> list[Param]:
        return [Param(p["name"], p["role"], tuple(p["shape"]), bool(p["trainable"]), layer["name"])
                for p in layer["params"]]

    def all_params(self) -> list[Param]:
        return [p for layer in self.layers for p in self.params(layer)]

    @property
    def called(self) -> list[dict]:
        return [layer for layer in self.layers if layer.get("called", True)]


@dataclass
class WeightMap:
    """How ``target``'s parameters take ``source``'s values.

    ``assign`` maps each target parameter to the source parameter whose value
    it takes; ``layers`` pairs layer indices (source, target) in call order;
    ``explicit`` names the target parameters the user mapped by hand.
    """

    source: str
    target: str
    assign: dict[str, str]
    layers: list[tuple[int, int]]
    explicit: set[str] = field(default_factory=set)

    def lines(self, source: ModelLayout, target: ModelLayout) -> list[str]:
        """One line per mapped parameter, for the report: 'target <- source (role, shape, how)'."""
        src = {p.name: p for p in source.all_params()}
        out = []
        for t in target.all_params():
            s = src[self.assign[t.name]]
            how = "explicit" if t.name in self.explicit else "by structure"
            out.append(f"{self.target}:{t.name} <- {self.source}:{s.name} ({s.role}, {list(s.shape)}, {how})")
        return out

    def to_dict(self, source: ModelLayout, target: ModelLayout) -> dict:
        src = {p.name: p for p in source.all_params()}
        return {"source": self.source, "target": self.target,
                "params": [{"target": t.name, "source": self.assign[t.name], "role": src[self.assign[t.name]].role,
                            "shape": list(t.shape), "how": "explicit" if t.name in self.explicit else "structure"}
                           for t in target.all_params()]}


def side_by_side(source: ModelLayout, target: ModelLayout, width: int = 52) -> str:
    """Both models' parameterized layers in call order, one row per layer position."""
    def column(layout: ModelLayout, layer: dict | None) -> list[str]:
        if layer is None:
            return ["-"]
        head = f"{layer['name']} ({layer['type']}{'' if layer.get('called', True) else ', never called'})"
        return [head] + [f"  {p['name'].rsplit('.', 1)[-1].rsplit('/', 1)[-1]}: {p['role']} {list(p['shape'])}"
                         for p in layer["params"]]

    rows = [f"{'#':>3}  {source.backend:<{width}}  {target.backend}"]
    for i in range(max(len(source.layers), len(target.layers))):
        a = column(source, source.layers[i] if i < len(source.layers) else None)
        b = column(target, target.layers[i] if i < len(target.layers) else None)
        for j in range(max(len(a), len(b))):
            rows.append(f"{(str(i) if j == 0 else ''):>3}  {(a[j] if j < len(a) else ''):<{width}}  "
                        f"{b[j] if j < len(b) else ''}")
    return "\n".join(rows)


def _pair_layer(s_params: list[Param], t_params: list[Param]) -> dict[str, str] | str:
    """{target: source} for one layer pair, by role then position; or why they cannot pair."""
    def by_role(params):
        groups: dict[str, list[Param]] = {}
        for p in params:
            groups.setdefault(p.role, []).append(p)
        return groups

    s_roles, t_roles = by_role(s_params), by_role(t_params)
    if sorted(s_roles) != sorted(t_roles) or any(len(s_roles[r]) != len(t_roles[r]) for r in s_roles):
        return (f"parameters {[f'{p.role} {list(p.shape)}' for p in s_params]} vs "
                f"{[f'{p.role} {list(p.shape)}' for p in t_params]}")
    out = {}
    for role in _ROLE_ORDER:
        for s, t in zip(s_roles.get(role, []), t_roles.get(role, [])):
            if s.shape != t.shape:
                return f"{role} shapes differ: {s.name} {list(s.shape)} vs {t.name} {list(t.shape)}"
            out[t.name] = s.name
    return out


_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")


def expand_rules(explicit: dict[str, str], target_names: list[str]) -> dict[str, str]:
    """Name rules written with placeholders, ``"transformer.h.{i}.attn.c_attn.kernel" =
    "transformer.h.{i}.attn.c_attn.weight"``, expanded into one entry per target name they match (a placeholder
    matches one name segment: no '.' or '/'); entries without a placeholder are kept as written. A rule that
    matches no target name, or names a placeholder its source side lacks, is a MappingError."""
    out: dict[str, str] = {}
    problems = []
    for t_rule, s_rule in explicit.items():
        names = _PLACEHOLDER.findall(t_rule)
        if not names:
            out[t_rule] = s_rule
            continue
        missing = sorted(set(_PLACEHOLDER.findall(s_rule)) - set(names))
        if missing:
            problems.append(f"name rule {t_rule!r} = {s_rule!r}: {{{missing[0]}}} on the right is not on the left")
            continue
        pattern = re.compile("".join(f"(?P<{part}>[^./]+)" if i % 2 else re.escape(part)
                                     for i, part in enumerate(_PLACEHOLDER.split(t_rule))) + "$")
        matched = [m for m in map(pattern.match, target_names) if m]
        if not matched:
            problems.append(f"name rule {t_rule!r} matches no parameter of the model (names such as "
                            f"{', '.join(target_names[:3])})")
        for m in matched:
            out.setdefault(m.string, _PLACEHOLDER.sub(lambda p: m.group(p.group(1)), s_rule))
    if problems:
        raise MappingError(problems)
    return out


def map_weights(source: ModelLayout, target: ModelLayout, explicit: dict[str, str] | None = None) -> WeightMap:
    """Map every parameter and state variable of ``target`` onto one of ``source``'s.

    ``explicit`` ({target name: source name}) is applied first and checked
    (names exist, shapes equal); the remaining layers are paired in call
    order. Raises MappingError, with both models side by side, when a name is
    unknown, a count or a shape differs, or a source value would be used twice.
    """
    s_all = {p.name: p for p in source.all_params()}
    t_all = {p.name: p for p in target.all_params()}
    explicit = expand_rules(dict(explicit or {}), list(t_all))
    problems = []
    for t, s in explicit.items():
        if t not in t_all:
            problems.append(f"explicit mapping names {target.backend} parameter {t!r}, which the model does not "
                            f"have (it has: {', '.join(t_all)})")
        elif s not in s_all:
            problems.append(f"explicit mapping maps {t!r} to {source.backend} parameter {s!r}, which the source "
                            f"model does not have (it has: {', '.join(s_all)})")
        elif s_all[s].shape != t_all[t].shape:
            problems.append(f"explicit mapping {t!r} <- {s!r}: shapes {list(t_all[t].shape)} and "
                            f"{list(s_all[s].shape)} differ (in the canonical layout: kernels (in, out))")
    if problems:
        raise MappingError(problems[:-1] + [problems[-1] + "\n\n" + side_by_side(source, target)])

    used_sources = set(explicit.values())
    # Layers left to map by structure: those with a parameter the explicit mapping did not cover.
    s_layers = [(i, [p for p in source.params(layer) if p.name not in used_sources])
                for i, layer in enumerate(source.layers)]
    t_layers = [(j, [p for p in target.params(layer) if p.name not in explicit])
                for j, layer in enumerate(target.layers)]
    s_layers = [(i, ps) for i, ps in s_layers if ps]
    t_layers = [(j, ps) for j, ps in t_layers if ps]
    assign = dict(explicit)
    pairs: list[tuple[int, int]] = []
    if len(s_layers) != len(t_layers):
        raise MappingError([
            f"{source.backend} has {len(s_layers)} layers with parameters to map, {target.backend} has "
            f"{len(t_layers)}: they do not pair up in call order. Map the differing ones explicitly "
            f"(mapping = {{ \"{target.backend} name\" = \"{source.backend} name\" }}) or fix the port.\n\n"
            + side_by_side(source, target)])
    for (i, s_params), (j, t_params) in zip(s_layers, t_layers):
        paired = _pair_layer(s_params, t_params)
        if isinstance(paired, str):
            raise MappingError([
                f"layer {i} does not map: {source.backend} {source.layers[i]['name']} "
                f"({source.layers[i]['type']}) vs {target.backend} {target.layers[j]['name']} "
                f"({target.layers[j]['type']}): {paired}\n\n" + side_by_side(source, target)])
        assign.update(paired)
        pairs.append((i, j))
    # Layers mapped wholly by hand still pair for localization, through their parameters.
    s_index = {p.name: i for i, layer in enumerate(source.layers) for p in source.params(layer)}
    t_index = {p.name: j for j, layer in enumerate(target.layers) for p in target.params(layer)}
    for t, s in explicit.items():
        pair = (s_index[s], t_index[t])
        if pair not in pairs and all(pj != pair[1] for _, pj in pairs):
            pairs.append(pair)
    pairs.sort()
    return WeightMap(source.backend, target.backend, assign, pairs, set(explicit))
