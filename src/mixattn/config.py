"""YAML -> omegaconf -> typed dataclasses, at the bottom of the package: it
imports nothing of mixattn. Unknown keys, wrong types and a dataclass's own
checks are errors that name the key and the file or the command line."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


class ConfigError(ValueError):
    pass


def load_yaml(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Load ``path`` and apply ``key=value`` dot-list overrides; return plain data."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    try:
        cfg = _load_extended(path, ())
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(cfg, resolve=True)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {e}") from None
    except Exception as e:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _load_extended(path: Path, chain: tuple[Path, ...]):
    """``path`` as an omegaconf node, merged over the file its ``extends:`` key
    names (relative to ``path``; that file may extend another). Mappings
    merge key by key, anything else (lists included) is replaced; ``${...}``
    interpolations resolve after every merge, so a base's
    ``save_folder: runs/${run_name}/checkpoints`` takes the recipe's run_name."""
    from omegaconf import DictConfig, OmegaConf

    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig) or "extends" not in cfg:
        return cfg
    base = cfg.pop("extends")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: extends must be the path of one YAML file (relative to this one), got {base!r}")
    target = (path.parent / base).resolve()
    if target in chain or target == path.resolve():
        loop = " -> ".join(str(c) for c in (*chain, path.resolve(), target))
        raise ConfigError(f"{path}: extends {base!r}, which makes a loop: {loop}")
    if not target.is_file():
        raise ConfigError(f"{path}: extends {base!r}, which does not exist (looked for {target})")
    return OmegaConf.merge(_load_extended(target, (*chain, path.resolve())), cfg)


def from_dict(cls, data: Any, where: str = "", source: str = "<config>"):
    """Plain data (from YAML, the command line or a checkpoint) -> dataclass
    ``cls``, recursively: the one place configs are built. Unknown keys, a
    value of the wrong type and the dataclass's own checks raise ConfigError
    naming the key path (``where``: ``model``, ``data.train[0]``) and where
    the data came from (``source``: the file, ``command line``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(f'{where}.{k}'.lstrip('.') for k in unknown)}; "
                          f"valid keys{' of ' + where if where else ''}: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        path = f"{where}.{name}".lstrip(".")
        kwargs[name] = _coerce(hint, value, path, source)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{source}: {where or 'recipe'}: {e}") from None
    except ValueError as e:  # a dataclass's own check (ConfigError is one): say where the data came from
        raise ConfigError(f"{source}: {e}") from None


def _coerce(hint, value, path, source):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path, source) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path, source)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {path} must be a list, got {value!r}")
        return [from_dict(args[0], v, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if hint in (int, float, str, bool) and value is not None:
        ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise ConfigError(f"{source}: {path} must be {hint.__name__}, got {value!r}")
    return value


def check_override_keys(overrides: typing.Sequence[str], cls) -> None:
    """A key=value override whose key dataclass ``cls`` does not have is
    refused as coming from the command line, with the closest valid key."""
    for override in overrides:
        key = override.partition("=")[0].strip()
        section, where = cls, ""
        for part in key.split("."):
            if section is None:
                break  # inside free-form data (lists, fsdp options): not checked here
            names = [f.name for f in dataclasses.fields(section) if f.init]
            if part not in names:
                close = difflib.get_close_matches(part, names, n=1)
                hint = f"; did you mean {(where + close[0])!r}?" if close else ";"
                raise ConfigError(f"command line: unknown key {key!r} (in {override!r}){hint} "
                                  f"valid keys{' of ' + where.rstrip('.') if where else ''}: {', '.join(sorted(names))}")
            hint_type = typing.get_type_hints(section).get(part)
            where += part + "."
            section = hint_type if dataclasses.is_dataclass(hint_type) else None



# -- credentials never leave the process --------------------------------------------

_SECRET_PARTS = {"key", "secret", "token", "password", "passwd", "credential", "credentials", "apikey", "sig",
                 "signature", "auth", "authorization"}
REDACTED = "***"


def _is_secret_name(name: str) -> bool:
    return any(part in _SECRET_PARTS for part in re.split(r"[^a-z0-9]+", name.lower()))


def _redact_url(text: str) -> str:
    if "://" not in text:
        return text
    try:
        u = urlsplit(text)
    except ValueError:
        return text
    netloc = u.netloc
    if "@" in netloc:  # scheme://user:password@host
        userinfo, host = netloc.rsplit("@", 1)
        netloc = (userinfo.split(":", 1)[0] + ":" + REDACTED if ":" in userinfo else REDACTED) + "@" + host
    query = u.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if _is_secret_name(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((u.scheme, netloc, u.path, query, u.fragment))


def redact(obj: Any) -> Any:
    """A copy of plain config data with credentials replaced by ``***``: the
    values of keys named like secrets (``*_key``, ``token``, ``password``, ...),
    passwords in URLs (``scheme://user:password@host``) and signed-URL query
    parameters (``X-Amz-Signature``, ``sig``, ...). What the saved config and
    the logged hyperparameters get; secrets belong in the environment."""
    if isinstance(obj, dict):
        return {k: (REDACTED if _is_secret_name(str(k)) and v not in (None, "") and not isinstance(v, (dict, list, bool))
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return _redact_url(obj)
    return obj
