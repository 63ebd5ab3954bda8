"""One command line for every command: Hydra's config composition over conf/, Hydra's override grammar.

Each command (``vit-atlas sweep|status|describe|spectrum|atlas|figures|examples|probes|zoo``, or
``python -m pipeline <command>``) is a :class:`pipeline.commands.Command`: a config name
(conf/<name>.yaml, typed by its schema) and a function of the typed config.
:func:`run` parses the command line once, the same way for all of them:

- ``KEY=VALUE`` / ``GROUP=OPTION`` overrides in Hydra's grammar (lists ``[a,b]``, ``+KEY=VALUE``
  adds a key, ``~KEY`` removes one), composed with Hydra's Compose API;
- ``-m`` / ``--multirun``: ``KEY=a,b`` (or ``range(...)``) runs the command once per
  combination, one after the other, like Hydra's basic launcher;
- ``--cfg job`` prints the composed config and runs nothing; ``--help`` prints the command's page.

Every malformed or unknown override is one paragraph on stderr starting ``error:`` and exit
status 2, before any compute and with nothing written: no command writes Hydra run
directories or ``.hydra/`` files. Logging goes to the console, configured once here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import gc
import itertools
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from dataclasses import dataclass
from typing import Any, NoReturn

from pipeline import config
from pipeline.commands import COMMANDS, Command
from pipeline.errors import EXIT_BAD_INPUT, PipelineError, reporting_errors

EXIT_INTERRUPTED = 130

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


@dataclass
class Arguments:
    help: bool = False
    multirun: bool = False
    cfg: bool = False
    overrides: list[str] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------- running a command

def run(command: Command, argv: Sequence[str] | None = None) -> int:
    """Run ``command`` on a command line (default ``sys.argv[1:]``); returns the exit status."""
    try:
        return _run(command, argv)
    except BrokenPipeError:  # `vit-atlas zoo | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(command: Command, argv: Sequence[str] | None) -> int:
    configure_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parse_arguments(command, argv)
        if args.help:
            print(help_page(command))
            return 0
        jobs = expand(command.name, args.overrides, args.multirun)
        composed = [compose(command.name, job) for job in jobs]  # every job checked before any runs
        typed = [to_typed(command.name, cfg) for cfg in composed]
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.cfg:
        from omegaconf import OmegaConf

        for number, (job, cfg) in enumerate(zip(jobs, composed), 1):
            if len(jobs) > 1:
                print(f"# job {number}/{len(jobs)}: {' '.join(job)}")
            print(OmegaConf.to_yaml(cfg), end="")
        return 0
    log = logging.getLogger("pipeline.cli")
    try:
        for number, (job, cfg) in enumerate(zip(jobs, typed), 1):
            if len(jobs) > 1:
                log.info("multirun job %d/%d: %s", number, len(jobs), " ".join(job) or "(defaults)")
            code = reporting_errors(lambda: command.run(cfg))
            if code:
                if len(jobs) > 1 and number < len(jobs):
                    log.warning("multirun stopped after job %d/%d (exit status %d)", number, len(jobs), code)
                return code
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def configure_logging() -> None:
    """Console logging, once per process (a no-op where logging is configured already, as under pytest)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def _parse_arguments(command: Command, argv: list[str]) -> Arguments:
    args = Arguments()
    items = iter(argv)
    for item in items:
        if item in ("-h", "--help"):
            args.help = True
        elif item in ("-m", "--multirun"):
            args.multirun = True
        elif item in ("-c", "--cfg") or item.startswith("--cfg="):
            which = item.partition("=")[2] if "=" in item else next(items, "")
            if which != "job":
                raise PipelineError(f"--cfg takes 'job' (the composed config), got {which or 'nothing'!r}: "
                                    f"`vit-atlas {command.name} --cfg job [overrides]` prints the config and runs "
                                    f"nothing (these commands have no Hydra config of their own).")
            args.cfg = True
        elif item.startswith("-") and "=" not in item:
            raise PipelineError(f"Unknown option {item!r}: the options are --help, --cfg job and -m/--multirun; "
                                f"everything else is KEY=VALUE. See `vit-atlas {command.name} --help`.")
        else:
            args.overrides.append(item)
    return args


# ----------------------------------------------------------------------------- overrides

def parse_override(name: str, text: str):
    """One override in Hydra's grammar; a PipelineError that names it otherwise."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if "=" not in text and not text.startswith("~"):
        raise PipelineError(f"Argument {text!r} is not of the form key=value: settings are KEY=VALUE (e.g. "
                            f"store.root=DIR), config groups GROUP=OPTION. See `vit-atlas {name} --help`.")
    try:
        override = OverridesParser.create().parse_overrides([text])[0]
    except HydraException as error:
        problem = _one_paragraph(str(error), drop=("See https://", "Error parsing override"))
        raise PipelineError(f"Cannot read {text!r}: {problem}. Overrides use Hydra's grammar: KEY=VALUE, lists "
                            f"as [a,b], strings with spaces or commas quoted ('a b'). See `vit-atlas {name} "
                            f"--help`.") from None
    if override.is_hydra_override():
        raise PipelineError(f"{text!r} sets Hydra's own configuration, which vit-atlas does not use (no command "
                            f"writes Hydra run directories or .hydra/ files): remove it.")
    return override


def expand(name: str, overrides: Sequence[str], multirun: bool = False) -> list[list[str]]:
    """The jobs of a command line: one list of overrides, or with multirun one per sweep combination."""
    choices: list[list[str]] = []
    for text in map(functools.partial(_group_spelling, name), overrides):
        override = parse_override(name, text)
        if override.is_sweep_override():
            key = override.get_key_element()
            if not multirun:
                raise PipelineError(f"{text!r} gives several values: add -m (--multirun) to run the command once "
                                    f"per value, or write a list as {key}=[...] (a string with commas quoted: "
                                    f"{key}='a,b').")
            if not override.is_discrete_sweep():
                raise PipelineError(f"{text!r} is not a sweep that can be listed: give the values (a,b,c) or "
                                    f"range(start,stop,step).")
            values = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            values = [text]
        _check_group(name, override.get_key_element().lstrip("+~"), override, values)
        choices.append(values)
    return [list(job) for job in itertools.product(*choices)]


def _group_spelling(name: str, text: str) -> str:
    """``optim.param=fourier``, the dotted spelling of the nested group optim/param, as Hydra's
    ``optim/param=fourier``: a group's settings are dotted (``optim.param.decay=1.5``), so its choice may be too."""
    key, sep, value = text.partition("=")
    group = key.replace(".", "/")
    if sep and "." in key and group in config_groups(name) and value and not value.startswith(("{", "[")):
        return f"{group}={value}"
    return text


def _check_group(name: str, key: str, override, values: list[str]) -> None:
    """GROUP=OPTION must name an option of this command's group (experiments are per command)."""
    groups = config_groups(name)
    if key not in groups or override.is_delete():
        return
    for text in values:
        option = text.partition("=")[2]
        if option in groups[key] or option == "null":
            continue
        owners = [other for other in COMMANDS if other != name and option in config_groups(other).get(key, ())]
        elsewhere = f" ('{option}' is an {key} of `vit-atlas {owners[0]}`)" if owners else ""
        near = difflib.get_close_matches(option, groups[key], n=3)
        hint = f" Did you mean: {', '.join(near)}?" if near and not owners else ""
        raise PipelineError(f"{key}={option} is not one of this command's {key} options: "
                            f"{', '.join(groups[key]) or 'none'}{elsewhere}.{hint} See `vit-atlas {name} --help`.")


# ----------------------------------------------------------------------------- composing

def compose(name: str, overrides: Sequence[str] = ()):
    """The command's config composed with ``overrides`` (a DictConfig); a PipelineError for bad input."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _register_schemas()
    if overrides is not _NO_OVERRIDES:
        overrides = [_group_spelling(name, text) for text in overrides]
    for i, text in enumerate(overrides):
        override = parse_override(name, text)
        if override.is_sweep_override():
            expand(name, [text])  # raises: several values without multirun
        _check_group(name, override.get_key_element().lstrip("+~"), override, [text])
        if overrides is not _NO_OVERRIDES and _sets_free_mapping(name, override):
            # KEY={a.b:[..]} on a free-form mapping (sweep.grid): Hydra's struct mode would refuse its new
            # keys unless added with ++, which sets (merges) the mapping as the user meant.
            overrides[i] = f"++{text}"
    try:
        with initialize_config_dir(config_dir=str(config.conf_dir()), version_base=None, job_name=name):
            return hydra_compose(config_name=name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise PipelineError(_explain(name, error)) from None


def _register_schemas() -> None:
    """Each command's schema in Hydra's ConfigStore, as ``<name>_schema`` (conf/<name>.yaml's first default)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, command in COMMANDS.items():
        store.store(name=f"{name}_schema", node=config.schema_node(command.schema))


def to_typed(name: str, cfg) -> Any:
    """The schema instance (pipeline.config) of a composed config: what a command hands its stages."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    unknown = _unknown_keys(cfg)
    if unknown:
        parent = unknown[0].rpartition(".")[0]
        where = f"the settings under {parent}" if parent else f"the settings of `vit-atlas {name}`"
        raise PipelineError(f"Unknown setting '{unknown[0]}'; {where} are {', '.join(_keys_under(name, parent))}. "
                            f"See `vit-atlas {name} --help`.")
    try:
        typed = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as error:
        flat = flatten_settings(OmegaConf.to_container(cfg, throw_on_missing=False))
        missing = [key for key, value in flat.items() if value == "???"] or [getattr(error, "full_key", "a setting")]
        settings = " ".join(f"{key}=..." for key in missing)
        raise PipelineError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required: "
                            f"`vit-atlas {name} {settings}` (`vit-atlas {name} --help` lists every setting).") from None
    except OmegaConfBaseException as error:
        raise PipelineError(_explain(name, error)) from None
    config.check_finite(typed, "")
    return typed


def _unknown_keys(node, prefix: str = "") -> list[str]:
    """Keys that ``+KEY=VALUE`` added to a typed section (free-form mappings may take new keys)."""
    from omegaconf import OmegaConf

    schema = OmegaConf.get_type(node)
    fields = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    unknown = []
    for key, value in node.items_ex(resolve=False):
        path = f"{prefix}.{key}" if prefix else str(key)
        if fields is not None and key not in fields:
            unknown.append(path)
        elif fields is not None and OmegaConf.is_dict(value):
            unknown += _unknown_keys(value, path)
    return unknown


def load(name: str, *overrides: str) -> Any:
    """The typed config a command hands its stages, from override strings (for tests and scripts)."""
    return to_typed(name, compose(name, overrides))


def _explain(name: str, error: Exception) -> str:
    """One paragraph for a Hydra or OmegaConf composition error."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = error.__cause__ if error.__cause__ is not None else error
    key = getattr(cause, "full_key", None) or ""
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        parent, _, _ = key.rpartition(".")
        known = _keys_under(name, parent)
        where = f"the settings under {parent}" if parent else f"the settings of `vit-atlas {name}`"
        near = difflib.get_close_matches(key.rpartition(".")[2], known, n=3)
        hint = f" Did you mean: {', '.join(near)}?" if near else ""
        return (f"Unknown setting '{key}'; {where} are {', '.join(known)}.{hint} See `vit-atlas {name} --help` "
                f"(a new key of a free-form mapping is added with +KEY=VALUE).")
    if isinstance(cause, ValidationError):
        problem = _one_paragraph(str(cause))
        return f"Bad value for {key or 'a setting'}: {problem}. See `vit-atlas {name} --help`."
    return f"{_one_paragraph(str(error))}{'' if str(error).endswith('.') else '.'} See `vit-atlas {name} --help`."


def _one_paragraph(text: str, drop: Sequence[str] = ()) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line, without their key/type trailer lines."""
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("Config search path", "provider=")):
            break
        if not line or line.startswith(("full_key:", "reference_type=", "object_type=", *drop)):
            continue
        lines.append(line)
    return " ".join(lines).rstrip(".")


def _keys_under(name: str, parent: str) -> list[str]:
    from omegaconf import OmegaConf

    node = OmegaConf.select(default_config(name), parent) if parent else default_config(name)
    return sorted(str(k) for k in node.keys()) if OmegaConf.is_dict(node) else []


_DEFAULTS: dict[str, Any] = {}
_NO_OVERRIDES: list[str] = []


def default_config(name: str):
    """The command's composed config without overrides (cached)."""
    if name not in _DEFAULTS:
        _DEFAULTS[name] = compose(name, _NO_OVERRIDES)
    return _DEFAULTS[name]


def _sets_free_mapping(name: str, override) -> bool:
    """A plain KEY={...} override of a mapping that is free-form (no schema of its own)."""
    from omegaconf import OmegaConf

    if override.is_add() or override.is_force_add() or override.is_delete() or override.package is not None:
        return False
    if not isinstance(override.value(), dict):
        return False
    node = OmegaConf.select(default_config(name), override.key_or_group, throw_on_missing=False)
    return OmegaConf.is_dict(node) and not dataclasses.is_dataclass(OmegaConf.get_type(node))


# ----------------------------------------------------------------------------- config groups

@functools.cache
def config_groups(name: str) -> dict[str, list[str]]:
    """The command's config groups (from its defaults list) and their options for this command, as
    Hydra's config loader finds them.

    An option that sets global keys (its ``# @package _global_`` header, like every experiment)
    belongs to the commands whose schema has all of its top-level keys: sweep experiments to the
    sweep, probe experiments to the probes.
    """
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    fields = {f.name for f in dataclasses.fields(COMMANDS[name].schema)}
    groups: dict[str, list[str]] = {}
    with initialize_config_dir(config_dir=str(config.conf_dir()), version_base=None):
        loader = GlobalHydra.instance().config_loader()
        for group in group_defaults(name):
            options = []
            for option in loader.get_group_options(group, results_filter=ObjectType.CONFIG):
                path = f"{group}/{option}"
                found = next(source.load_config(path) for source in loader.get_sources() if source.is_config(path))
                keys = set(found.config.keys()) - {"defaults"}
                if found.header.get("package") == "_global_" and not keys <= fields:
                    continue
                options.append(option)
            groups[group] = options
    return groups


def group_defaults(name: str) -> dict[str, Any]:
    """The command's config groups and their default options: its defaults list's, and the groups nested in
    those options' own defaults lists (conf/optim/paper.yaml's param: optim/param)."""
    import yaml

    def defaults(path: Path) -> dict[str, Any]:
        entries = (yaml.safe_load(path.read_text()) or {}).get("defaults", []) if path.is_file() else []
        return {group: choice for entry in entries if isinstance(entry, dict) for group, choice in entry.items()}

    groups = defaults(config.conf_dir() / f"{name}.yaml")
    for group, choice in list(groups.items()):
        if choice:
            groups.update({f"{group}/{sub}": option for sub, option in
                           defaults(config.conf_dir() / group / f"{choice}.yaml").items()})
    return groups


# ----------------------------------------------------------------------------- help

def help_page(command: Command) -> str:
    """The command's own page: purpose, usage, config groups, settings with defaults, examples."""
    from omegaconf import OmegaConf

    name = command.name
    cfg = default_config(name)
    values = flatten_settings(OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False))
    comments = _comments(name)
    lines = [f"vit-atlas {name}: {command.purpose}.", "",
             f"usage: vit-atlas {name} [--help] [--cfg job] [-m] [GROUP=OPTION ...] [KEY=VALUE ...]",
             f"   or: python -m pipeline {name} ...", ""]
    groups = config_groups(name)
    if groups:
        lines.append("config groups (GROUP=OPTION):")
        defaults = group_defaults(name)
        width = max(len(g) for g in groups)
        for group, options in groups.items():
            lines.append(f"  {group:<{width}}  {', '.join(options) or '(none)'}  "
                         f"(default: {defaults.get(group) or 'none'})")
        lines.append("")
    lines.append("settings (KEY=VALUE; the defaults shown; ??? = required):")
    width = max(len(key) + len(format_setting(value)) + 1 for key, value in values.items())
    for key, value in values.items():
        setting = f"{key}={format_setting(value)}"
        lines.append(f"  {setting:<{width}}  # {comments[key]}" if key in comments else f"  {setting}")
    lines += ["", "Values use Hydra's override grammar: lists [a,b]; quote strings with spaces or commas; "
              "+KEY=VALUE adds a key to a free-form mapping. With -m (--multirun), KEY=a,b runs the command "
              "once per value, one after the other. --cfg job prints the composed config and runs nothing. "
              "Bad input is one paragraph on stderr and exit status 2, before anything runs."]
    if command.examples:
        lines += ["", "examples:", *(f"  {example}" for example in command.examples)]
    return "\n".join(lines)


def flatten_settings(node: Any, prefix: str = "") -> dict[str, Any]:
    """A config's nested settings as ``{"a.b.c": value}``, the dotted keys a command line sets."""
    if isinstance(node, dict) and node:
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(flatten_settings(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: node}


def format_setting(value: Any) -> str:
    """A setting's value as a command line writes it (``null``, ``true``, ``[1,2]``, ``{k:v}``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_setting(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_setting(v)}" for k, v in value.items()) + "}"
    return str(value)


_COMMENTED = re.compile(r"^(\s*)([\w-]+):[^#]*#\s*(.+)$")
_KEY = re.compile(r"^(\s*)([\w-]+):")


def _comments(name: str) -> dict[str, str]:
    """Trailing YAML comments of the command's file and its default group files, by dotted key."""
    root = config.conf_dir()
    files = [(root / f"{name}.yaml", "")]
    for group, choice in group_defaults(name).items():
        if choice and (root / group / f"{choice}.yaml").is_file():
            files.append((root / group / f"{choice}.yaml", f"{group.replace('/', '.')}."))
    comments: dict[str, str] = {}
    for path, prefix in files:
        stack: list[tuple[int, str]] = []
        for line in path.read_text().splitlines():
            match = _KEY.match(line)
            if not match or line.lstrip().startswith(("#", "-")):
                continue
            indent = len(match[1])
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, match[2]))
            commented = _COMMENTED.match(line)
            if commented and stack[0][1] != "defaults":
                comments[prefix + ".".join(key for _, key in stack)] = commented[3].strip()
    return comments


# ----------------------------------------------------------------------------- the vit-atlas script

def script() -> NoReturn:
    """The ``vit-atlas`` script and ``python -m pipeline``: :func:`main`, then the process's exit.

    Before it, every object made so far is frozen out of the garbage collector (``gc.freeze``): Python's last
    collections would otherwise walk the whole heap of a process that imported torch, timm, Ray and pyarrow,
    about a CPU second at every command's end (docs/benchmarks.md) that frees nothing the exit does not. The
    exit itself is ordinary: ``atexit`` handlers (Ray's shutdown among them) and threads are finished as
    always. Only here, never in :func:`main`, which tests and other programs call in their own process."""
    status = main()
    gc.freeze()
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """``vit-atlas COMMAND [ARGS...]``: run one of the commands (``vit-atlas --help`` lists them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    listing = "\n".join(f"  {name:<9} {command.purpose}" for name, command in COMMANDS.items())
    usage = (f"usage: vit-atlas COMMAND [--help] [--cfg job] [-m] [KEY=VALUE ...]\n\ncommands:\n{listing}\n\n"
             f"`vit-atlas COMMAND --help` shows a command's settings and examples; `python -m pipeline COMMAND` "
             f"is the same command.")
    if argv[:1] in (["-h"], ["--help"]):
        print(f"vit-atlas: feature visualization for vision transformers across model zoos, at cluster scale.\n\n"
              f"{usage}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        given = f"Unknown command {argv[0]!r}" if argv else "No command given"
        near = difflib.get_close_matches(argv[0], COMMANDS, n=1) if argv else []
        hint = f" Did you mean: {near[0]}?" if near else ""
        print(f"error: {given}: the commands are {', '.join(COMMANDS)}.{hint} `vit-atlas --help` says what "
              f"each does.", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run(COMMANDS[argv[0]], argv[1:])
