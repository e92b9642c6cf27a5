"""TOML configurations for training, analysis and sweeps, with validation.

A configuration is a nested mapping of sections (``model``, ``data``,
``train``, ``analysis``, ``output`` and, for sweeps, ``sweep`` and ``grid``)
to options. :data:`OPTIONS` is the schema: every option has a type, a rule,
a default and a one-line help text, and every option is also a command-line
flag of ``opx`` (``train.lr`` is ``--train-lr``). Validation fills in the
defaults and rejects unknown keys and bad values with a :class:`ConfigError`
that names the key, the rule and the value received.

The effective configuration -- the file, the flags and the defaults merged --
is written beside every result with :func:`save_config`, so that a result can
be reproduced from the folder it lives in.
"""

from __future__ import annotations

import copy
import difflib
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis._runfiles import atomic_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "OPTIONS",
    "ConfigError",
    "Option",
    "add_config_flags",
    "bundled_configs",
    "config_from_flags",
    "default_config",
    "flag_name",
    "get_option",
    "load_config",
    "merge_overrides",
    "parse_grid_flags",
    "resolve_config_path",
    "save_config",
    "validate_config",
]

_NETWORKS = ("ds", "d", "nd", "d_ab", "nd_ab", "nld_ab", "nlnd_ab", "unet")
_INITS = (
    "default",
    "identity",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
)
_SOURCES = ("basis_2x2", "span_2x2", "sample_images", "digits", "cifar10", "folder")


class ConfigError(ValueError):
    """A configuration key, value or file that does not validate.

    Attributes
    ----------
    key : str or None
        Dotted key (``"train.lr"``) the error is about, if any.
    rule : str
        What the value must satisfy.
    value : object
        The value received.
    source : str or None
        Where the value came from: a file name, ``"flag"`` or None.
    """

    def __init__(
        self,
        key: str | None,
        rule: str,
        value: Any,
        source: str | None = None,
    ) -> None:
        self.key = key
        self.rule = rule
        self.value = value
        self.source = source
        where = f" (in {source})" if source else ""
        subject = f"config key {key!r}" if key else "config"
        super().__init__(f"{subject} {rule}; got {value!r}{where}")


@dataclass(frozen=True)
class Option:
    """One configuration option of the schema.

    Attributes
    ----------
    kind : str
        ``"int"``, ``"float"``, ``"str"``, ``"bool"``, ``"int_list"`` or
        ``"str_list"``.
    default : object
        Value used when the option is not given; None means "not set": the
        option is then not passed on and not written to saved configs.
    help : str
        One line for ``--help`` and the docs.
    choices : tuple or None
        Allowed values (for ``str`` options and list entries).
    minimum, maximum : float or None
        Inclusive bounds for numbers (and list entries).
    exclusive_minimum : bool
        Whether ``minimum`` itself is excluded.
    """

    kind: str
    default: Any
    help: str
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False

    def rule(self) -> str:
        """The rule in words, as error messages state it."""
        base = {
            "int": "an integer",
            "float": "a number",
            "str": "a string",
            "bool": "true or false",
            "int_list": "a list of integers",
            "str_list": "a list of strings",
        }[self.kind]
        parts = []
        if self.choices is not None:
            parts.append("one of " + ", ".join(map(str, self.choices)))
        if self.minimum is not None:
            op = ">" if self.exclusive_minimum else ">="
            parts.append(f"{op} {self.minimum:g}")
        if self.maximum is not None:
            parts.append(f"<= {self.maximum:g}")
        if not parts:
            return f"must be {base}"
        joiner = " with entries " if self.kind.endswith("_list") else " "
        return f"must be {base}{joiner}" + " and ".join(parts)


def _o(kind: str, default: Any, help: str, **rules: Any) -> Option:
    return Option(kind, default, help, **rules)


#: The schema: section -> option name -> :class:`Option`.
OPTIONS: dict[str, dict[str, Option]] = {
    "model": {
        "name": _o("str", "ds", "network to build", choices=_NETWORKS),
        "init": _o("str", "default", "weight initialization", choices=_INITS),
        "scale": _o("float", None, "factor on the initial weights", minimum=0),
        "seed": _o("int", 0, "seed of the initialization", minimum=0),
        "channels": _o("int", None, "filters of networks D and ND", minimum=1),
        "depth": _o(
            "int", None, "conv layers after the first (D, ND, U-Net)", minimum=1
        ),
        "a": _o(
            "int", None, "filters a on full-size maps (D_ab, ND_ab, ...)", minimum=1
        ),
        "b": _o("int", None, "filters b on downsampled maps (D_ab, ...)", minimum=1),
        "width": _o("int", None, "base width of the U-Net", minimum=1),
        "in_channels": _o("int", None, "image channels C", minimum=1),
        "input_size": _o("int", None, "image side s of the 3 x s x s input", minimum=1),
        "negative_slope": _o("float", None, "LeakyReLU slope (NLD, NLND)", minimum=0),
        "linear": _o("bool", None, "linear U-Net (no activations)"),
    },
    "data": {
        "source": _o(
            "str", "basis_2x2", "where training images come from", choices=_SOURCES
        ),
        "indices": _o(
            "int_list", [0], "basis images for basis_2x2", minimum=0, maximum=3
        ),
        "dim": _o("int", 1, "span dimension for span_2x2", minimum=1, maximum=4),
        "n": _o(
            "int",
            None,
            "number of images (unset: 1 for sample_images, dim for span_2x2, "
            "all for digits, cifar10 and folder)",
            minimum=1,
        ),
        "size": _o("int", 32, "image side for sample_images and folder", minimum=1),
        "seed": _o("int", 0, "seed of the image selection", minimum=0),
        "digit": _o(
            "int", None, "digit class for digits (all when unset)", minimum=0, maximum=9
        ),
        "classes": _o("str_list", None, "CIFAR-10 class names (all when unset)"),
        "root": _o("str", None, "folder holding cifar-10-batches-py"),
        "path": _o("str", None, "image folder for source folder"),
        "mode": _o(
            "str", "crop", "how folder images become s x s", choices=("crop", "resize")
        ),
        "split": _o("str", "train", "CIFAR-10 split", choices=("train", "test")),
    },
    "train": {
        "optimizer": _o("str", "adam", "optimizer", choices=("adam", "sgd")),
        "lr": _o("float", 1e-4, "learning rate", minimum=0, exclusive_minimum=True),
        "momentum": _o("float", None, "SGD momentum", minimum=0, maximum=1),
        "max_iter": _o("int", 2000, "largest number of iterations", minimum=1),
        "tol": _o(
            "float", 1e-4, "stop when the loss improves by less (0: off)", minimum=0
        ),
        "target_loss": _o("float", None, "stop once the loss is below this", minimum=0),
        "seed": _o("int", 0, "seed of the training run", minimum=0),
        "device": _o("str", "auto", "auto, cpu, cuda or cuda:N"),
        "dtype": _o(
            "str", "float32", "training precision", choices=("float32", "float64")
        ),
        "batch_size": _o(
            "int", None, "mini-batch size (full batch when unset)", minimum=1
        ),
        "progress": _o("bool", True, "show a progress bar"),
        "threads": _o("int", None, "torch threads while training", minimum=1),
    },
    "analysis": {
        "layout": _o(
            "str", "compact", "operator layout", choices=("compact", "padded")
        ),
        "k": _o("int", None, "eigenpairs to compute (all or 64 when unset)", minimum=1),
        "delta": _o(
            "float", 0.05, "eigenvalues within delta of 1 count as near 1", minimum=0
        ),
        "rtol": _o(
            "float",
            None,
            "relative tolerance of the numerical rank (report default 1e-2)",
            minimum=0,
            exclusive_minimum=True,
        ),
        "ablation_ks": _o(
            "int_list", [], "truncation ranks of the SVD ablation", minimum=1
        ),
        "probes": _o("int", 0, "probe inputs of each kind (0: no probes)", minimum=0),
    },
    "output": {
        "dir": _o("str", "results", "folder results are written to"),
        "figures": _o("bool", True, "write PNG figures and a report"),
    },
    "sweep": {
        "name": _o("str", "sweep", "name of the sweep"),
        "scheduler": _o("str", None, "address of a running Dask scheduler"),
        "n_workers": _o("int", 2, "worker processes of the local cluster", minimum=1),
        "threads": _o("int", 1, "torch threads per job", minimum=1),
        "gpu": _o("bool", False, "each job asks for one GPU resource"),
        "retry_failed": _o("bool", False, "run failed jobs again"),
    },
}

_TOP_LEVEL = {"name": "str", "description": "str"}


def get_option(key: str) -> Option:
    """Return the :class:`Option` of a dotted key.

    Parameters
    ----------
    key : str
        ``"section.option"``, for example ``"train.lr"``.

    Returns
    -------
    Option

    Raises
    ------
    ConfigError
        If the key is not in :data:`OPTIONS`.

    Examples
    --------
    >>> get_option("train.lr").default
    0.0001
    """
    section, _, name = key.partition(".")
    if section not in OPTIONS:
        raise ConfigError(
            key, f"must start with a section ({_known(OPTIONS, section)})", key
        )
    if name not in OPTIONS[section]:
        raise ConfigError(
            key, f"is not an option of [{section}]{_known(OPTIONS[section], name)}", key
        )
    return OPTIONS[section][name]


def _known(names: Mapping[str, Any] | Sequence[str], given: str) -> str:
    close = difflib.get_close_matches(given, list(names), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"; known: {', '.join(names)}{hint}"


def _check(key: str, option: Option, value: Any, source: str | None) -> Any:
    """Check one value against its option; return it normalized."""

    def fail() -> None:
        raise ConfigError(key, option.rule(), value, source)

    def scalar(kind: str, v: Any) -> Any:
        if kind == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                fail()
            v = int(v)
        elif kind == "float":
            if isinstance(v, bool) or not isinstance(v, int | float):
                fail()
            v = float(v)
            if v != v:  # NaN satisfies no bound
                fail()
        elif kind == "str":
            if not isinstance(v, str):
                fail()
        elif kind == "bool":
            if not isinstance(v, bool):
                fail()
            return v
        if option.choices is not None and v not in option.choices:
            fail()
        if option.minimum is not None:
            if v < option.minimum or (option.exclusive_minimum and v == option.minimum):
                fail()
        if option.maximum is not None and v > option.maximum:
            fail()
        return v

    if option.kind.endswith("_list"):
        if isinstance(value, str) or not isinstance(value, Sequence):
            fail()
        entry = option.kind.removesuffix("_list")
        return [scalar(entry, v) for v in value]
    return scalar(option.kind, value)


def _check_device(value: str, source: str | None) -> None:
    ok = value in ("auto", "cpu", "cuda") or (
        value.startswith("cuda:") and value[5:].isdigit()
    )
    if not ok:
        raise ConfigError(
            "train.device", "must be auto, cpu, cuda or cuda:N", value, source
        )


def default_config(sections: Sequence[str] | None = None) -> dict[str, dict]:
    """Return the defaults of the schema as a nested dict.

    Parameters
    ----------
    sections : sequence of str, optional
        Sections to include; all but ``sweep`` when None.

    Returns
    -------
    dict
        Section -> option -> default (options whose default is None are
        left out).

    Examples
    --------
    >>> default_config(["train"])["train"]["optimizer"]
    'adam'
    """
    if sections is None:
        sections = [s for s in OPTIONS if s != "sweep"]
    return {
        s: {
            k: copy.deepcopy(o.default)
            for k, o in OPTIONS[s].items()
            if o.default is not None
        }
        for s in sections
    }


def validate_config(
    config: Mapping[str, Any],
    *,
    source: str | None = None,
    allow_grid: bool = False,
) -> dict[str, Any]:
    """Validate a configuration and fill in the defaults.

    Parameters
    ----------
    config : mapping
        Nested mapping as read from TOML: top-level ``name`` and
        ``description`` strings, and the sections of :data:`OPTIONS`.
    source : str, optional
        Where the configuration came from, named in error messages.
    allow_grid : bool, default False
        Accept the ``sweep`` section and a ``grid`` table mapping dotted keys
        to lists of values (a sweep configuration). Each grid value is
        validated against its option.

    Returns
    -------
    dict
        A new nested dict with every section present and defaults filled in.

    Raises
    ------
    ConfigError
        Naming the first key that does not validate, the rule and the value.

    Examples
    --------
    >>> cfg = validate_config({"train": {"lr": 1e-3}})
    >>> cfg["train"]["lr"], cfg["train"]["max_iter"]
    (0.001, 2000)
    >>> validate_config({"train": {"lr": -1.0}})
    Traceback (most recent call last):
    ...
    analysis.config.ConfigError: config key 'train.lr' must be a number > 0; got -1.0
    """
    if not isinstance(config, Mapping):
        raise ConfigError(None, "must be a table of sections", config, source)
    sections = [s for s in OPTIONS if allow_grid or s != "sweep"]
    out: dict[str, Any] = default_config(sections)
    for key, value in config.items():
        if key in _TOP_LEVEL:
            if not isinstance(value, str):
                raise ConfigError(key, "must be a string", value, source)
            out[key] = value
            continue
        if key == "grid" and allow_grid:
            out["grid"] = _validate_grid(value, source)
            continue
        if key not in sections:
            known = list(sections) + list(_TOP_LEVEL) + (["grid"] if allow_grid else [])
            raise ConfigError(
                key, f"is not a known section{_known(known, key)}", key, source
            )
        if not isinstance(value, Mapping):
            raise ConfigError(key, "must be a table of options", value, source)
        for name, v in value.items():
            option = OPTIONS[key].get(name)
            if option is None:
                raise ConfigError(
                    f"{key}.{name}",
                    f"is not an option of [{key}]{_known(OPTIONS[key], name)}",
                    v,
                    source,
                )
            out[key][name] = _check(f"{key}.{name}", option, v, source)
    _check_device(out["train"]["device"], source)
    return out


def _validate_grid(grid: Any, source: str | None) -> dict[str, list]:
    if not isinstance(grid, Mapping):
        raise ConfigError(
            "grid", "must be a table of dotted keys to lists", grid, source
        )
    out = {}
    for key, values in _flatten(grid).items():
        if key.startswith("sweep."):
            raise ConfigError(
                f"grid.{key}", "must not vary a sweep option", values, source
            )
        try:
            option = get_option(key)
        except ConfigError as exc:
            raise ConfigError(f"grid.{key}", exc.rule, values, source) from None
        if isinstance(values, str) or not isinstance(values, Sequence) or not values:
            raise ConfigError(
                f"grid.{key}", "must be a non-empty list of values", values, source
            )
        checked = [_check(f"grid.{key}", option, v, source) for v in values]
        if key == "train.device":
            for v in checked:
                _check_device(v, source)
        out[key] = checked
    return out


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten ``{"train": {"lr": [..]}}`` and ``{"train.lr": [..]}`` alike."""
    flat = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def load_config(
    path: str | os.PathLike | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    allow_grid: bool = False,
) -> dict[str, Any]:
    """Read a TOML configuration, apply overrides and validate it.

    Parameters
    ----------
    path : path-like, optional
        TOML file; the defaults alone when None. A bare name such as
        ``"ds_identity"`` is also looked up among the bundled configs in
        ``data/configs``.
    overrides : mapping, optional
        Dotted key -> value, applied after the file (flags do this).
    allow_grid : bool, default False
        Accept sweep sections (see :func:`validate_config`).

    Returns
    -------
    dict
        The validated configuration.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ConfigError
        If the file is not valid TOML or a value does not validate.

    Examples
    --------
    >>> cfg = load_config(overrides={"model.init": "identity"})
    >>> cfg["model"]["init"]
    'identity'
    """
    raw: dict[str, Any] = {}
    source = None
    if path is not None:
        file = resolve_config_path(path)
        source = str(path)
        try:
            with open(file, "rb") as fh:
                raw = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(
                None, f"must be valid TOML ({exc})", str(path), None
            ) from None
    cfg = validate_config(raw, source=source, allow_grid=allow_grid)
    if overrides:
        cfg = merge_overrides(cfg, overrides, source="flag")
    return cfg


def resolve_config_path(path: str | os.PathLike) -> Path:
    """Find a config file by path, or by name among the bundled configs.

    Examples
    --------
    >>> resolve_config_path("ds_identity").name
    'ds_identity.toml'
    """
    p = Path(path)
    if p.is_file():
        return p
    for folder in _config_dirs():
        for candidate in (folder / p.name, folder / f"{p.name}.toml"):
            if p.parent == Path(".") and candidate.is_file():
                return candidate
    raise FileNotFoundError(f"config file {str(path)!r} does not exist")


def _config_dirs() -> list[Path]:
    # The configs live in the checkout's data/configs; an installed package
    # also looks in analysis/configs (setup.cfg's package_data).
    here = Path(__file__).resolve().parent
    return [here.parent / "data" / "configs", here / "configs"]


def bundled_configs() -> list[Path]:
    """Paths of the reproduction configs shipped with the checkout.

    Examples
    --------
    >>> "ds_span_2x2" in [p.stem for p in bundled_configs()]
    True
    """
    found = []
    for folder in _config_dirs():
        if folder.is_dir():
            found.extend(sorted(folder.glob("*.toml")))
    return found


def merge_overrides(
    config: Mapping[str, Any],
    overrides: Mapping[str, Any],
    *,
    source: str | None = None,
) -> dict[str, Any]:
    """Return a copy of a validated config with dotted-key overrides applied.

    Parameters
    ----------
    config : mapping
        A validated configuration.
    overrides : mapping
        Dotted key -> value; None values are ignored.
    source : str, optional
        Named in error messages (``"flag"`` for command-line flags).

    Returns
    -------
    dict

    Examples
    --------
    >>> cfg = merge_overrides(validate_config({}), {"data.dim": 3})
    >>> cfg["data"]["dim"]
    3
    """
    out = copy.deepcopy(dict(config))
    for key, value in overrides.items():
        if value is None:
            continue
        if key in _TOP_LEVEL:
            out[key] = value
            continue
        option = get_option(key)
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = _check(key, option, value, source)
        if key == "train.device":
            _check_device(value, source)
    return out


def save_config(config: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a configuration as TOML, atomically.

    Options that are not set (None) are left out, since TOML has no null.

    Parameters
    ----------
    config : mapping
        Nested configuration.
    path : path-like
        Target file.

    Returns
    -------
    pathlib.Path
        The file written.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = tempfile.mkdtemp()
    >>> cfg = validate_config({"train": {"lr": 0.01}})
    >>> p = save_config(cfg, pathlib.Path(d, "c.toml"))
    >>> load_config(p)["train"]["lr"]
    0.01
    """
    import tomli_w

    def clean(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {str(k): clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    text = tomli_w.dumps(clean(config))
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# -- command-line flags ---------------------------------------------------------


def flag_name(key: str) -> str:
    """The command-line flag of a dotted config key.

    Examples
    --------
    >>> flag_name("train.max_iter")
    '--train-max-iter'
    """
    return "--" + key.replace(".", "-").replace("_", "-")


def _dest(key: str) -> str:
    return "cfg__" + key.replace(".", "__")


def add_config_flags(parser: Any, sections: Sequence[str]) -> None:
    """Add one flag per option of the given sections to an argparse parser.

    Flags take strings; they are parsed and validated by
    :func:`config_from_flags`, so that a bad value gets the same message as
    in a file.

    Examples
    --------
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_config_flags(parser, ["train"])
    >>> ns = parser.parse_args(["--train-max-iter", "50"])
    >>> config_from_flags(ns)["train"]["max_iter"]
    50
    """
    for section in sections:
        group = parser.add_argument_group(f"[{section}] options")
        for name, option in OPTIONS[section].items():
            key = f"{section}.{name}"
            meta = {"int_list": "N,N,...", "str_list": "S,S,..."}.get(
                option.kind, option.kind.upper()
            )
            default = "unset" if option.default is None else option.default
            if option.kind == "bool":
                meta = "{true,false}"
            if option.choices:
                meta = "{" + ",".join(map(str, option.choices)) + "}"
            group.add_argument(
                flag_name(key),
                dest=_dest(key),
                metavar=meta,
                default=None,
                help=f"{option.help} (default: {default})",
            )


def _parse_flag(key: str, text: str) -> Any:
    option = get_option(key)
    kind = option.kind

    def one(k: str, t: str) -> Any:
        t = t.strip()
        try:
            if k == "int":
                return int(t)
            if k == "float":
                return float(t)
        except ValueError:
            raise ConfigError(key, option.rule(), t, "flag") from None
        if k == "bool":
            low = t.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ConfigError(key, option.rule(), t, "flag")
        return t

    if kind.endswith("_list"):
        entry = kind.removesuffix("_list")
        return [one(entry, t) for t in text.split(",") if t.strip()]
    return one(kind, text)


def parse_grid_flags(specs: Sequence[str]) -> dict[str, list]:
    """Turn ``["data.dim=1,2,3", "model.seed=0,1"]`` into a validated grid.

    Examples
    --------
    >>> parse_grid_flags(["data.dim=1,2", "train.lr=1e-3,1e-2"])
    {'data.dim': [1, 2], 'train.lr': [0.001, 0.01]}
    """
    grid: dict[str, list] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(
                "grid", "flags must look like --grid KEY=V1,V2,...", spec, "flag"
            )
        option = get_option(key)
        if option.kind.endswith("_list"):
            raise ConfigError(
                f"grid.{key}", "must be varied in a config file (list values)",
                spec, "flag",
            )  # fmt: skip
        grid[key] = [_parse_flag(key, v) for v in values.split(",") if v.strip()]
    return _validate_grid(grid, "flag")


def config_from_flags(
    namespace: Any,
    *,
    base: Mapping[str, Any] | None = None,
    path: str | os.PathLike | None = None,
    allow_grid: bool = False,
) -> dict[str, Any]:
    """Merge a config file (or ``base``) with the flags set on the command line.

    Parameters
    ----------
    namespace : argparse.Namespace
        Parsed arguments from a parser set up by :func:`add_config_flags`.
    base : mapping, optional
        Validated configuration to start from (instead of ``path``).
    path : path-like, optional
        TOML file to start from.
    allow_grid : bool, default False
        Accept sweep sections.

    Returns
    -------
    dict
        The effective configuration.
    """
    overrides = {}
    for dest, text in vars(namespace).items():
        if dest.startswith("cfg__") and text is not None:
            key = dest[5:].replace("__", ".")
            overrides[key] = _parse_flag(key, text)
    if base is None:
        base = load_config(path, allow_grid=allow_grid)
    return merge_overrides(base, overrides, source="flag")
