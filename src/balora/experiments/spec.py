"""Experiment specs: one reader for `balora compare` (`CompareSpec`) and `balora lab` (`LabSpec`).

`Fields` gives typed access to a spec mapping; every error names the spec file and the key path
(``spec.yaml: ratios[1]: ...``), so a typo is found before anything runs.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balora.core.config import ConfigError
from balora.experiments.paired import DEFAULT_BOOTSTRAP
from balora.training.run_config import parse_override, preset_path, read_yaml

__all__ = ["CompareSpec", "Fields", "LabSpec", "load_lab_spec", "load_spec", "read_spec_file", "spec_from_dict"]

Kind = type | tuple[type, ...]

SPEC_KEYS = ("name", "base", "base_config", "output_dir", "grid", "variants", "per_method", "overrides", "metrics",
             "lower_is_better", "selection", "paired", "reuse")
LAB_KEYS = ("experiment", "name", "output_dir", "paper")  # every lab spec may set these
VARIANT_KEY = "variant"
DEFAULT_LOWER_IS_BETTER = ["loss", "perplexity", "cross_entropy", "forgetting", "train_seconds",
                           "wall_seconds"]


def _kind_name(kind: Kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true/false",
                        dict: "a mapping", list: "a list"}.get(k, k.__name__) for k in kinds)


def _is_kind(value: Any, kind: Kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:  # YAML's true is no integer here
        return False
    return isinstance(value, kind)


@dataclass
class Fields:
    """A spec mapping with checked, typed access; ``prefix`` is its key path inside the spec file.

    An absent key and an explicit ``null`` both mean "use the default"."""

    data: dict[str, Any]
    source: str
    prefix: str = ""

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError that names the spec and the key."""
        return ConfigError(f"{self.source}: {self.prefix}{key}: {message}")

    def check_keys(self, known: Sequence[str], what: str = "unknown key") -> None:
        """Every key is one of ``known``."""
        for key in self.data:
            if key not in known:
                raise self.error(key, f"{what}; known: {', '.join(known)}")

    def value(self, key: str, kind: Kind, default: Any = None) -> Any:
        """``data[key]`` checked against ``kind``; ``default`` when absent (None: optional)."""
        value = self.data.get(key)
        if value is None:
            return default
        if not _is_kind(value, kind):
            raise self.error(key, f"expected {_kind_name(kind)}, got {value!r}")
        return value

    def list_of(self, key: str, kind: Kind, default: list[Any] | None = None, *,
                nonempty: bool = True) -> list[Any]:
        """``data[key]`` as a list of ``kind``; required when there is no default."""
        value = self.data.get(key)
        if value is None:
            value = default
        if value is None:
            raise self.error(key, "required")
        if not isinstance(value, list) or (nonempty and not value):
            raise self.error(key, f"expected a {'non-empty ' if nonempty else ''}list, got {value!r}")
        for i, item in enumerate(value):
            if not _is_kind(item, kind):
                raise self.error(f"{key}[{i}]", f"expected {_kind_name(kind)}, got {item!r}")
        return list(value)

    def mapping(self, key: str, default: dict[str, Any] | None = None) -> dict[str, Any]:
        """``data[key]`` as a mapping; required when there is no default."""
        value = self.data.get(key)
        if value is None:
            value = default
        if value is None:
            raise self.error(key, "required")
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping, got {value!r}")
        return dict(value)

    def section(self, key: str, known: Sequence[str] | None = None,
                default: dict[str, Any] | None = None) -> Fields:
        """The mapping under ``key`` as `Fields` (its keys checked against ``known`` when given)."""
        sub = Fields(self.mapping(key, default), self.source, f"{self.prefix}{key}.")
        if known is not None:
            sub.check_keys(known)
        return sub


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """A spec file's mapping ("1e-3" read as a number; a YAML error names the line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such spec file")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the spec must be a mapping, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------- compare
SELECTION_KEYS = ("metric", "search", "seeds")
ALL_METHODS = "all"


@dataclass
class SelectionSpec:
    """Model selection before the grid runs: for each group of the grid (e.g. each method), the
    candidate values of ``search`` are trained on the selection ``seeds`` and scored on the
    validation split; the best mean ``metric`` is then used for every seed of that group."""

    metric: str  # a metric of the validation split, e.g. validation.accuracy
    search: dict[str, dict[str, list[Any]]]  # method (or "all") -> {key path: candidate values}
    seeds: list[int] | None = None  # None: the grid's first training.seed (else the base's seed)

    def space(self, method: str) -> dict[str, list[Any]]:
        """The candidate values searched for ``method``: its own entry, else the ``all`` entry."""
        return self.search.get(method, self.search.get(ALL_METHODS, {}))

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "search": self.search, "seeds": self.seeds}


def _selection(spec: Fields, grid: dict[str, list[Any]]) -> SelectionSpec | None:
    if spec.data.get("selection") is None:
        return None
    sel = spec.section("selection", SELECTION_KEYS)
    metric = sel.value("metric", str)
    if metric is None:
        raise sel.error("metric", "required: the validation metric that picks the winner, e.g. validation.accuracy")
    if not metric.startswith("validation."):
        raise sel.error("metric", f"{metric!r}: selection reads the validation split only; name a "
                                  "validation.* metric (the test split is kept for the final cells)")
    search = sel.mapping("search")
    if not search:
        raise sel.error("search", "expected at least one entry: all (or a method) -> {key.path: [values]}")
    parsed: dict[str, dict[str, list[Any]]] = {}
    for who, space in search.items():
        if not isinstance(space, dict) or not space:
            raise sel.error(f"search.{who}", f"expected a mapping of key.path -> list of values, got {space!r}")
        for key, values in space.items():
            where = f"search.{who}.{key}"
            if not isinstance(values, list) or not values:
                raise sel.error(where, f"expected a non-empty list of candidate values, got {values!r}")
            if key == "output_dir" or key.startswith("eval.") or key == "training.seed":
                raise sel.error(where, "not searchable (output_dir, eval.* and the seed are set by compare)")
            if key in grid:
                raise sel.error(where, "is a grid key; search a key the grid does not set")
        parsed[str(who)] = {k: list(v) for k, v in space.items()}
    seeds = sel.list_of("seeds", int, None) if sel.data.get("seeds") is not None else None
    return SelectionSpec(metric=metric, search=parsed, seeds=seeds)


PAIRED_KEYS = ("pairs", "metric", "bootstrap", "reference")


@dataclass
class PairedSpec:
    """The ``paired:`` block: which groups are compared seed by seed (`balora.experiments.paired`)."""

    pairs: list[list[str]] | None = None  # None: the default pairs (reference, else the methods)
    metric: str | list[str] | None = None  # None: the spec's first metric; a list: each of them
    bootstrap: int = DEFAULT_BOOTSTRAP  # replicates of the item bootstrap; 0: the t interval only
    reference: str | None = None  # a variant (else a method): every other one against it

    def metrics(self, default: list[str]) -> list[str]:
        """The metrics compared: ``metric`` (one or a list), else the first of ``default``."""
        if self.metric is None:
            return default[:1]
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    def to_dict(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "metric": self.metric, "bootstrap": self.bootstrap, "reference": self.reference}


def _pair_name(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)  # as a group label writes a grid value


def _paired(spec: Fields) -> PairedSpec:
    block = spec.section("paired", PAIRED_KEYS, default={})
    pairs = None
    if block.data.get("pairs") is not None:
        pairs = block.list_of("pairs", list)
        for i, pair in enumerate(pairs):
            if len(pair) != 2 or not all(isinstance(x, (str, int, float)) and x != "" for x in pair):
                raise block.error(f"pairs[{i}]", f"expected [A, B]: two group names or grid values, got {pair!r}")
        pairs = [[_pair_name(x) for x in pair] for pair in pairs]
    reference = block.value("reference", (str, int, float))
    if pairs is not None and reference is not None:
        raise block.error("reference", "give pairs or reference, not both")
    bootstrap = block.value("bootstrap", int, DEFAULT_BOOTSTRAP)
    if bootstrap < 0:
        raise block.error("bootstrap", f"expected a number of replicates >= 0 (0: t interval only), got {bootstrap}")
    metric = block.data.get("metric")
    if isinstance(metric, list):
        metric = block.list_of("metric", str)
    elif metric is not None:
        metric = block.value("metric", str)
    return PairedSpec(pairs=pairs, metric=metric, bootstrap=bootstrap,
                      reference=None if reference is None else _pair_name(reference))


@dataclass
class CompareSpec:
    """A parsed, not yet expanded, comparison spec (format: `balora.experiments.compare`)."""

    name: str
    base: dict[str, Any]
    output_dir: Path
    grid: dict[str, list[Any]]
    overrides: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    lower_is_better: list[str] = field(default_factory=lambda: list(DEFAULT_LOWER_IS_BETTER))
    source: str = "<spec>"  # for error messages
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    selection: SelectionSpec | None = None
    paired: PairedSpec = field(default_factory=PairedSpec)
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)
    # output directories of other comparisons whose finished runs a cell may adopt (`balora.experiments.reuse`)
    reuse: list[Path] = field(default_factory=list)

    def lower_better(self, metric: str) -> bool:
        """Whether a lower value of ``metric`` is better (an entry equal to it or ending it)."""
        return any(metric == e or metric.endswith("." + e) for e in self.lower_is_better)

    def to_dict(self) -> dict[str, Any]:
        """The spec as summary.json records it."""
        return {"name": self.name, "output_dir": str(self.output_dir), "grid": self.grid,
                "variants": self.variants, "overrides": self.overrides, "metrics": self.metrics,
                "lower_is_better": self.lower_is_better, "base_config": self.base, "source": self.source,
                **({"per_method": self.per_method} if self.per_method else {}),
                **({"reuse": [str(d) for d in self.reuse]} if self.reuse else {}),
                **({"selection": self.selection.to_dict()} if self.selection else {}),
                "paired": self.paired.to_dict()}


def _find_base(name: str, spec_dir: Path | None) -> Path:
    candidates = [spec_dir / name] if spec_dir is not None else []
    candidates.append(Path(name))
    candidates.append(preset_path(Path(name).name))
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"base: {name!r} not found (tried {', '.join(str(p) for p in candidates)})")


def _base_config(spec: Fields, spec_dir: Path | None) -> dict[str, Any]:
    data = spec.data
    if ("base" in data) == ("base_config" in data):
        raise ConfigError(f"{spec.source}: give exactly one of base (a run config file) and base_config (inline)")
    if "base_config" in data:
        if not isinstance(data["base_config"], dict):
            raise spec.error("base_config", f"expected a mapping, got {type(data['base_config']).__name__}")
        # a copy: specs built from one mapping (a lab's levels) must not share, and so change, one base
        return copy.deepcopy(data["base_config"])
    if not isinstance(data["base"], str):
        raise spec.error("base", f"expected a file path, got {data['base']!r}")
    path = _find_base(data["base"], spec_dir)
    base = read_yaml(path) or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: the run configuration must be a mapping")
    return base


def _grid(spec: Fields) -> dict[str, list[Any]]:
    grid = spec.data.get("grid") or {}
    if not isinstance(grid, dict):
        raise spec.error("grid", "expected a mapping of key path -> list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise spec.error(f"grid.{key}", f"expected a non-empty list of values, got {values!r}")
        if key == "output_dir":
            raise spec.error("grid.output_dir", "not allowed; each cell trains into <output_dir>/cells/<id>/run")
    return dict(grid)


def _variants(spec: Fields, grid: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    variants = spec.data.get("variants") or {}
    if not isinstance(variants, dict):
        raise spec.error("variants", "expected a mapping of name -> {key.path: value}")
    for name, options in variants.items():
        if not isinstance(options, dict):
            raise spec.error(f"variants.{name}", f"expected a mapping of key.path: value, got {options!r}")
        if "output_dir" in options:
            raise spec.error(f"variants.{name}.output_dir", "not allowed")
    if variants and VARIANT_KEY in grid:
        raise spec.error(f"grid.{VARIANT_KEY}", "reserved for the variants axis; name the variants under "
                                                "`variants:` instead")
    return {str(k): dict(v) for k, v in variants.items()}


def _per_method(spec: Fields, selection: SelectionSpec | None) -> dict[str, dict[str, Any]]:
    """``per_method``: method -> {key.path: value}, applied to that method's cells after the grid values
    (e.g. each method's learning rate selected in another comparison). A key that selection searches for
    the same method would be overwritten by the search's candidates: refused."""
    block = spec.data.get("per_method") or {}
    if not isinstance(block, dict):
        raise spec.error("per_method", "expected a mapping of method -> {key.path: value}")
    parsed: dict[str, dict[str, Any]] = {}
    for method, options in block.items():
        if not isinstance(options, dict) or not options:
            raise spec.error(f"per_method.{method}", f"expected a mapping of key.path: value, got {options!r}")
        for key in options:
            if key in ("output_dir", "method", "training.seed"):
                raise spec.error(f"per_method.{method}.{key}", "not allowed (set by the grid or by compare)")
            if selection is not None and key in selection.space(str(method)):
                raise spec.error(f"per_method.{method}.{key}", "also searched by selection for this method; "
                                                                "set it in one place")
        parsed[str(method)] = dict(options)
    return parsed


def _reuse(spec: Fields, output_dir: str) -> list[Path]:
    """``reuse``: output directories of other comparisons (paths as for output_dir); each must exist."""
    dirs = [Path(d) for d in spec.list_of("reuse", str, [], nonempty=False)]
    for i, d in enumerate(dirs):
        if d == Path(output_dir):
            raise spec.error(f"reuse[{i}]", f"{d} is this comparison's own output_dir")
        if not (d / "cells").is_dir():
            raise spec.error(f"reuse[{i}]", f"{d}: not the output_dir of a comparison (no {d / 'cells'}); name "
                                            "the output_dir of a comparison that has run, or remove it")
    return dirs


def spec_from_dict(data: Any, *, spec_dir: Path | None = None, source: str = "<spec>",
                   default_name: str = "compare") -> CompareSpec:
    """Check a spec mapping (unknown keys, types, the base config) and return a `CompareSpec`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the spec must be a mapping, got {type(data).__name__}")
    spec = Fields(data, source)
    spec.check_keys(SPEC_KEYS, "unknown spec key")
    base = _base_config(spec, spec_dir)
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise spec.error("name", f"expected a non-empty string, got {name!r}")
    grid = _grid(spec)
    variants = _variants(spec, grid)
    overrides = spec.list_of("overrides", str, [], nonempty=False)
    for text in overrides:
        if parse_override(text)[0] == ["output_dir"]:
            raise spec.error("overrides", f"{text!r}: set the spec's output_dir instead")
    output_dir = data.get("output_dir", f"runs/compare-{name}")
    if not isinstance(output_dir, str) or not output_dir:
        raise spec.error("output_dir", f"expected a path, got {output_dir!r}")
    selection = _selection(spec, grid)
    return CompareSpec(name=name, base=base, output_dir=Path(output_dir), grid=grid, overrides=overrides,
                       metrics=spec.list_of("metrics", str, [], nonempty=False),
                       lower_is_better=spec.list_of("lower_is_better", str, DEFAULT_LOWER_IS_BETTER, nonempty=False),
                       source=source, variants=variants, selection=selection, paired=_paired(spec),
                       per_method=_per_method(spec, selection), reuse=_reuse(spec, output_dir))


def load_spec(path: str | Path) -> CompareSpec:
    """Read and check a comparison spec file."""
    path = Path(path)
    return spec_from_dict(read_spec_file(path), spec_dir=path.parent, source=str(path), default_name=path.stem)


# ---------------------------------------------------------------------------- lab
class LabSpec(Fields):
    """A checked lab spec: its mapping, the experiment it is for, and where its outputs go."""

    def __init__(self, experiment: str, data: dict[str, Any], path: Path, output_dir: Path) -> None:
        super().__init__(data, str(path))
        self.experiment = experiment
        self.path = path
        self.output_dir = output_dir

    @property
    def paper(self) -> str | None:
        """The optional ``paper:`` text (the reference numbers a report shows next to its own)."""
        return self.value("paper", str)

    def compare_spec(self, where: str, mapping: Any, *, name: str, output_dir: Path,
                     grid: dict[str, list[Any]] | None = None, overrides: Sequence[str] = (),
                     metrics: Sequence[str] = ()) -> CompareSpec:
        """A `balora compare` spec from the sub-mapping at ``where`` (base/base_config, overrides...);
        the lab sets name and output_dir and adds its own grid keys and overrides."""
        if not isinstance(mapping, dict):
            raise self.error(where, f"expected a mapping (a compare spec: base or base_config, overrides...), "
                                    f"got {mapping!r}")
        for key in ("name", "output_dir"):
            if key in mapping:
                raise self.error(f"{where}.{key}", "set by the lab (the spec's output_dir); remove it")
        data = dict(mapping)
        if grid:
            clash = [k for k in grid if k in (data.get("grid") or {})]
            if clash:
                raise self.error(f"{where}.grid.{clash[0]}", "set by the lab spec's own keys; remove it here")
            data["grid"] = {**grid, **(data.get("grid") or {})}
        data["overrides"] = list(overrides) + list(data.get("overrides") or [])
        if metrics and "metrics" not in data:
            data["metrics"] = list(metrics)
        data.update(name=name, output_dir=str(output_dir))
        try:
            return spec_from_dict(data, spec_dir=self.path.parent, source=f"{self.path}: {where}", default_name=name)
        except ConfigError as error:
            message = str(error)
            if not message.startswith(str(self.path)):  # e.g. a base file's own error: say which key led there
                message = f"{self.path}: {where}: {message}"
            raise ConfigError(message) from None


def load_lab_spec(path: str | Path, experiment: str, known: Sequence[str], required: Sequence[str] = ()) -> LabSpec:
    """Read a lab spec; unknown or missing keys and an ``experiment:`` naming another lab are errors.

    ``output_dir`` defaults to ``runs/lab-<experiment>`` (relative to the current directory)."""
    path = Path(path)
    data = read_spec_file(path)
    named = data.get("experiment", experiment)  # first: a wrong spec has "unknown" keys too
    if named != experiment:
        raise ConfigError(f"{path}: experiment: this spec is for {named!r}; run it with `balora lab {named} {path}`")
    fields = Fields(data, str(path))
    fields.check_keys((*LAB_KEYS, *known), f"unknown key for `balora lab {experiment}`")
    for key in required:
        if data.get(key) is None:
            raise fields.error(key, "required")
    output_dir = data.get("output_dir", f"runs/lab-{experiment}")
    if not isinstance(output_dir, str) or not output_dir:
        raise fields.error("output_dir", f"expected a path, got {output_dir!r}")
    spec = LabSpec(experiment, data, path, Path(output_dir))
    spec.value("paper", str)  # checked now, not when the report is written
    return spec
