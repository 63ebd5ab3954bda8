"""From a sweep config to work units with deterministic keys, validated before any compute.

A :class:`Plan` is a list of :class:`Group` s, one per (model, weights, target,
objective, layer, seed, optimizer config); a group holds the features to
visualize. Everything a worker needs travels in a :class:`Chunk` (a slice of a
group's features), and every key is a pure function of the unit's fields
(pipeline.store.schemas.unit_key), so re-planning the same sweep gives the same keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import config
from pipeline.config import OptimConfig, SweepConfig
from pipeline.engine import parameterizations
from pipeline.models import directions as directions_lib
from pipeline.models import weights as weights_lib
from pipeline.models import zoo
from pipeline.errors import PipelineError
from pipeline.engine import cost
from pipeline.engine.objectives import check_objective, parse_objective
from pipeline.store.schemas import UNIT_SCHEMA, unit_keys

GRID_SECTIONS = ("optim", "target", "model")
SELECTION_KEYS = ("models", "layers", "features", "seeds")
_RANGE = re.compile(r"(\d+)-(\d+)")
_HEAD_TAIL = re.compile(r"(first|last):(\d+)")


@dataclass(frozen=True)
class Group:
    model: str
    family: str
    weights: weights_lib.WeightsChoice
    target: str
    objective: str
    layer: int
    seed: int
    optim: OptimConfig
    config_hash: str
    config_json: str
    features: tuple[int, ...]
    directions: directions_lib.DirectionsFile | None = None  # units are its rows (target.directions), not channels

    def key(self, feature: int) -> str:
        return self.keys([feature])[0]

    def keys(self, features) -> list[str]:
        return unit_keys(self.model, self.weights.weights_id, self.target, self.objective, self.layer, features,
                         self.seed, self.config_hash)

    def unit(self, feature: int, key: str | None = None) -> dict[str, Any]:
        """The unit of ``feature``; ``key``: its key, when the caller has hashed it already."""
        return {"key": key or self.key(feature), "model": self.model, "family": self.family,
                "weights": self.weights.weights_id, "target": self.target, "objective": self.objective,
                "layer": self.layer, "feature": feature, "seed": self.seed, "config_hash": self.config_hash}


@dataclass(frozen=True)
class Chunk:
    """Features of one group, optimized together in one batch by one worker."""

    group: Group
    features: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"chunk {self.group.model} layer {self.group.layer} features {list(self.features)}"

    def units(self) -> list[dict[str, Any]]:
        return [self.group.unit(f) for f in self.features]

    def split(self) -> tuple["Chunk", "Chunk"]:
        half = len(self.features) // 2
        return Chunk(self.group, self.features[:half]), Chunk(self.group, self.features[half:])


@dataclass
class Plan:
    groups: list[Group]
    # Per group, its units' keys in feature order, computed once: a key is a hash, and a driver
    # resuming a million-unit sweep passes over every key several times (to do, cost, chunks).
    _keys: list[tuple[str, ...]] = field(default_factory=list, repr=False, compare=False)

    def __len__(self) -> int:
        return sum(len(g.features) for g in self.groups)

    def keyed_groups(self) -> list[tuple[Group, tuple[str, ...]]]:
        """Each group with the keys of its features, in order."""
        if len(self._keys) != len(self.groups):
            self._keys = [tuple(g.keys(g.features)) for g in self.groups]
        return list(zip(self.groups, self._keys))

    def keys(self) -> list[str]:
        return [key for _, keys in self.keyed_groups() for key in keys]

    def weights(self) -> list[tuple[str, weights_lib.WeightsChoice]]:
        """Each distinct (model, weights choice) of the plan."""
        return list(dict.fromkeys((g.model, g.weights) for g in self.groups))

    def cost(self, done: set[str]) -> tuple[int, float, list[str]]:
        """(image-steps, FLOPs, notes) of the units not yet done: steps x copies truncated forward and backward
        passes; a note says where a model's FLOPs were counted from its layout instead (cost.forward_flops)."""
        image_steps, flops, notes = 0, 0.0, []
        for group, keys in self.keyed_groups():
            todo = sum(key not in done for key in keys)
            counts, note = cost.forward_flops(group.model, group.weights.img_size)
            if note and note not in notes:
                notes.append(note)
            image_steps += todo * group.optim.steps * group.optim.copies
            flops += todo * cost.unit_flops(counts[group.layer], group.optim.steps, group.optim.copies)
        return image_steps, flops, notes

    def costliest_group(self, done: set[str]) -> "Group":
        """The group whose remaining units cost the most FLOPs: what a calibration should time."""
        def remaining(keyed: tuple[Group, tuple[str, ...]]) -> float:
            group, keys = keyed
            todo = sum(key not in done for key in keys)
            return todo * group.optim.steps * cost.forward_flops(group.model, group.weights.img_size)[0][group.layer]
        return max(self.keyed_groups(), key=remaining)[0]

    def units_table(self) -> pa.Table:
        units = [g.unit(f, key) for g, keys in self.keyed_groups() for f, key in zip(g.features, keys)]
        return pa.Table.from_pylist(units, schema=UNIT_SCHEMA)

    def chunks(self, done: set[str], chunk_size: int) -> list[Chunk]:
        chunks = []
        for group, keys in self.keyed_groups():
            todo = [f for f, key in zip(group.features, keys) if key not in done]
            chunks.extend(Chunk(group, tuple(todo[i:i + chunk_size])) for i in range(0, len(todo), chunk_size))
        return chunks


def select(spec: Any, count: int, what: str, where: str) -> list[int]:
    """``all`` | ``first:N`` | ``last:N`` | ``A-B`` (inclusive) | N | [N, ...] -> indices, range-checked.

    A range is checked before it is expanded, so ``0-999999999`` and ``last:999999999`` cost nothing to refuse.
    """
    if isinstance(spec, str):
        spec = spec.strip()
        if spec == "all":
            return list(range(count))
        if match := _HEAD_TAIL.fullmatch(spec):
            n = int(match[2])
            if n > count:  # as A-B past the end: never clamped to fewer units than were asked for
                raise PipelineError(
                    f"{what.capitalize()} {spec} out of range for {where}, which has {count} {what}s: "
                    f"valid {what}s are 0..{count - 1}, so {match[1]}:N takes N up to {count}."
                )
            return list(range(n)) if match[1] == "first" else list(range(count - n, count))
        if match := _RANGE.fullmatch(spec):
            start, end = int(match[1]), int(match[2])
            if start > end:
                raise PipelineError(
                    f"Cannot read {what} selection '{spec}': a range A-B runs upwards and includes both ends, "
                    f"so write it as {end}-{start}."
                )
            _check_range([start, end] if end >= count else [], count, what, where, f"{start}-{end}")
            return list(range(start, end + 1))
        if spec.isdigit():
            indices = [int(spec)]
        else:
            raise PipelineError(
                f"Cannot read {what} selection '{spec}': use all, first:N, last:N, A-B (inclusive), "
                f"a number, or a list like [0,5,11]."
            )
    elif isinstance(spec, int):
        indices = [spec]
    else:
        try:
            indices = [int(i) for i in spec]
        except (TypeError, ValueError):
            raise PipelineError(f"Cannot read {what} selection {spec!r}: expected a list of integers.") from None
    _check_range([i for i in indices if not 0 <= i < count], count, what, where)
    return list(dict.fromkeys(indices))


def _check_range(bad: list[int], count: int, what: str, where: str, shown: str = "") -> None:
    if bad:
        raise PipelineError(
            f"{what.capitalize()} {shown or bad[:5]} out of range for {where}, which has {count} {what}s: "
            f"valid {what}s are 0..{count - 1}."
        )


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{optim: {tv: [..]}} and {"optim.tv": [..]} alike -> {"optim.tv": [..]}."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _grid_points(grid: dict[str, Any]) -> list[dict[str, Any]]:
    flat = {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in _flatten(grid).items()}
    for key in flat:
        if key.split(".")[0] not in GRID_SECTIONS or "." not in key:
            raise PipelineError(
                f"sweep.grid key '{key}' is not a hyper-parameter: grid keys name optim.*, target.* or "
                f"model.* settings, e.g. sweep.grid={{optim.tv:[0.1,1.0]}}."
            )
    return [dict(zip(flat, values)) for values in itertools.product(*flat.values())]


def _apply(cfg: SweepConfig, changes: dict[str, dict[str, Any]], key: str, value: Any, where: str) -> None:
    """Note ``key=value`` of a variant or grid point in ``changes`` (per section), once the key names a setting:
    a sweep selection, an optim/target/model setting, or the parameterization's (optim.param: a name,
    optim.param.KNOB: one of its settings, checked when they are typed)."""
    section, _, name = key.partition(".")
    setting, _, knob = name.partition(".")
    allowed = (SELECTION_KEYS if section == "sweep" else
               [f.name for f in dataclasses.fields(getattr(cfg, section))] if section in GRID_SECTIONS else ())
    if setting not in allowed or (knob and (section, setting) != ("optim", "param")):
        raise PipelineError(
            f"{where} key '{key}' names no setting: use sweep.{{{','.join(SELECTION_KEYS)}}} or an existing "
            f"optim.*, target.* or model.* setting."
        )
    if (section, setting) == ("optim", "param"):
        changes["optim"].setdefault("param", {})[knob or "name"] = value
    else:
        changes[section][name] = value


def _with_changes(cfg: SweepConfig, changes: dict[str, dict[str, Any]]) -> SweepConfig:
    """The sweep config of one variant and grid point: each changed section typed anew (OmegaConf checks the
    values against the section's types, its ``__post_init__`` their ranges), the others as they are."""
    optim = cfg.optim
    param = changes["optim"].pop("param", None)
    if param is not None:
        # Another parameterization starts from its own YAML; the same one keeps the settings given to it.
        name = param.get("name", optim.param["name"])
        base = optim.param if name == optim.param["name"] else config.param_values(name)
        optim = dataclasses.replace(optim, param={**base, **param})
    typed = {"sweep": dataclasses.replace(cfg.sweep, **changes["sweep"]), "optim": optim}
    for section in GRID_SECTIONS:
        value = typed.get(section, getattr(cfg, section))
        if changes[section]:
            try:
                value = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(value), changes[section]))
            except OmegaConfBaseException as error:
                problem = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise PipelineError(f"Bad setting {section}.{getattr(error, 'full_key', '') or ''}: {problem}.") \
                    from None
        typed[section] = value
    return dataclasses.replace(cfg, **typed)


def optim_config(optim: OptimConfig, family: str) -> tuple[OptimConfig, parameterizations.ParamSettings]:
    """The optimizer settings of one group, as planned: ``lr: auto`` resolved for the model family, and the
    parameterization's settings typed and checked before any compute (pipeline.engine.parameterizations), also
    returned typed."""
    optim = optim.for_family(family)
    param = parameterizations.settings(optim.param).prepared()
    return dataclasses.replace(optim, param=dataclasses.asdict(param)), param


def build_plan(cfg: SweepConfig, pin_weights: bool = True) -> Plan:
    """Expand and validate the sweep; raises PipelineError on any bad input, before any compute.

    Pretrained weights are found (or fetched) to name them by revision (``weights.resolve``);
    ``pin_weights=False`` touches no weights, for a plan that is only looked at.

    The sweep is (each of ``sweep.variants``, default one empty variant) x (each
    point of ``sweep.grid``) x models x layers x features x seeds. A variant
    overrides any of sweep.models/layers/features/seeds and optim/target/model
    settings together, for parts that differ in more than one value (the demo's
    random and planted weights look at different layers). A unit planned twice
    is kept once.
    """
    variants = cfg.sweep.variants or [{}]
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise PipelineError("sweep.variants must be a list of mappings, e.g. [{model.weights: planted, "
                            "sweep.layers: [1]}].")
    groups: list[Group] = []
    keys: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for variant in variants:
        for point in _grid_points(cfg.sweep.grid or {}):
            changes: dict[str, dict[str, Any]] = {section: {} for section in (*GRID_SECTIONS, "sweep")}
            for key, value in _flatten(variant).items():
                _apply(cfg, changes, key, value, "sweep.variants")
            for key, value in point.items():
                _apply(cfg, changes, key, value, "sweep.grid")
            part = _with_changes(cfg, changes)
            if not part.sweep.models:
                raise PipelineError("sweep.models is empty: name at least one model, e.g. "
                                    "sweep.models=[deit_tiny_patch16_224].")
            for model in part.sweep.models:
                for group in _groups_for_model(str(model), part, pin_weights):
                    new = [(f, key) for f, key in zip(group.features, group.keys(group.features)) if key not in seen]
                    seen.update(key for _, key in new)
                    if new:
                        groups.append(dataclasses.replace(group, features=tuple(f for f, _ in new)))
                        keys.append(tuple(key for _, key in new))
    return Plan(groups, keys)


def _check_input_size(model: str, img_size: int, info: zoo.ModelLayout, max_tokens: int, copies: int) -> None:
    """A size the architecture takes may still be far beyond any machine: the patch tokens per image are
    bounded by ``model.max_tokens``, and what a worker must allocate (the parameters, whose position embeddings
    grow with the grid, and one attention map per copy) by this machine's memory. Both before any allocation."""
    rows, cols = info.layers[0].grid
    multiple = zoo.size_multiple(model)
    native = zoo.native_size(model)
    if rows * cols > max_tokens:
        largest = max(multiple, int(math.isqrt(max_tokens) * info.input_size[-1] / rows) // multiple * multiple)
        sizes = sorted({max(multiple, largest - k * multiple) for k in range(4)})
        raise PipelineError(
            f"model.img_size={img_size} is too large for '{model}': {rows * cols:,} patch tokens per image (a "
            f"{rows}x{cols} grid), more than model.max_tokens={max_tokens:,}. Valid sizes are multiples of "
            f"{multiple} up to {largest}, e.g. {', '.join(map(str, sizes))}; its native size is {native} "
            f"(model.img_size=null). Raise model.max_tokens only for a machine that holds such a model."
        )
    tokens = info.layers[0].tokens
    needed = zoo.parameter_bytes(model, img_size) + copies * tokens * tokens * 4
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > memory:
        raise PipelineError(
            f"model.img_size={img_size} needs at least {needed / 2**30:,.1f} GiB for '{model}' (its parameters at "
            f"that size and one {tokens:,}x{tokens:,} attention map per copy, optim.copies={copies}), more than "
            f"this machine's {memory / 2**30:,.1f} GiB. Choose a smaller model.img_size (its native size is "
            f"{native}) or fewer optim.copies."
        )


def _check_not_empty(selected: list, axis: str, spec: Any, example: str) -> None:
    """A sweep axis that selects nothing would make a sweep of no units: a mistake, not a request."""
    if not len(selected):
        raise PipelineError(f"sweep.{axis}={spec} selects no {axis}, so the sweep would have no units and do "
                            f"nothing; give at least one, e.g. {example}.")


def _groups_for_model(model: str, part: SweepConfig, pin_weights: bool) -> list[Group]:
    sweep = part.sweep
    family = zoo.family_of(model)
    target = part.target.kind.value
    objective = parse_objective(part.target.objective)
    choice = weights_lib.resolve(model, str(part.model.weights), int(part.model.init_seed), part.model.img_size,
                                 pin_weights)
    info = zoo.layout(model, choice.img_size)
    optim, param = optim_config(part.optim, family)
    if choice.img_size:
        _check_input_size(model, choice.img_size, info, part.model.max_tokens, optim.copies)
    # The hash names everything besides the unit's own fields that changes its image: the shared optimizer
    # settings, the parameterization's own (its identity: MACO's spectrum by its bytes) and none of another
    # parameterization's, when it is not the model's native one the input size, and a directions file by its
    # bytes. ``optim.precision: auto`` enters as written, never as what a worker measured and chose: keys are the
    # same on every machine, and each record's config says the precision it was made in (``precision_used``).
    directions = _planned_directions(part.target.directions)
    shared = {f.name: getattr(optim, f.name) for f in dataclasses.fields(optim) if f.name != "param"}
    identity = {**shared, "param": param.identity(), **({"image_size": choice.img_size} if choice.img_size else {}),
                **_directions_identity(directions)}
    config_hash = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    config_json = json.dumps({"optim": dataclasses.asdict(optim), "param_identity": param.identity(),
                              "target": target, "objective": objective.name, "weights": str(part.model.weights),
                              "weights_id": choice.weights_id, "image_size": info.input_size[-1],
                              **({"directions": directions.provenance()} if directions else {})}, sort_keys=True)
    groups = []
    layers = select(sweep.layers, len(info.layers), "layer", f"'{model}'")
    _check_not_empty(layers, "layers", sweep.layers, "sweep.layers=[0]")
    _check_not_empty(sweep.seeds, "seeds", sweep.seeds, "sweep.seeds=[0]")
    for layer in layers:
        where = f"layer {layer} of '{model}'"
        width = info.site(layer, target).features
        if directions:  # the layer's units are the file's rows
            directions_lib.check_width(directions, width, target, where)
            width = directions.count
        check_objective(objective, info.layer(layer).grid, where)
        unit = f"the directions of target '{target}'" if directions else f"target '{target}'"
        features = select(sweep.features, width, "feature", f"{unit} at {where}")
        _check_not_empty(features, "features", sweep.features, "sweep.features=first:8")
        for seed in sweep.seeds:
            groups.append(Group(model, family, choice, target, objective.name, layer, int(seed), optim,
                                config_hash, config_json, tuple(features), directions))
    return groups


def _planned_directions(path: str | None) -> directions_lib.DirectionsFile | None:
    """``target.directions``, read whole and checked before any compute; None: the units are channels."""
    return None if path is None else directions_lib.plan_directions(str(path))


def _directions_identity(directions: directions_lib.DirectionsFile | None) -> dict[str, str]:
    """What the config hash (and so every unit key) takes of a directions file: its bytes' sha256, never its
    path (a file rewritten in place plans other units, a copy elsewhere the same ones)."""
    return {"directions": directions.sha256} if directions else {}
