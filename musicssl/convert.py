"""Upstream checkpoints -> musicssl: safe reading, key helpers, and the converted-weights cache.

A ported family reads the upstream files in its encoder's `load_upstream(files)` with
`read_checkpoint` (``torch.load(weights_only=True)`` plus an explicit allow-list, never a full
unpickle), maps the state dict with its module's `checkpoint_filter_fn`, and loads it strictly.
`load_converted` runs that once per pinned source and keeps the result as a release folder under
``<cache>/converted/``, so a second load reads safetensors only: no network, no pickle, no conversion.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from musicssl import hub
from musicssl.errors import ReleaseFormatError

log = logging.getLogger(__name__)

CONVERTED_DIR = "converted"


# --- reading upstream files ---------------------------------------------------------------------
def _stand_in(dotted: str) -> type:
    """An empty class that unpickles in place of `dotted` (e.g. omegaconf's DictConfig) and keeps
    the pickled state in `state`, so metadata objects never need their package imported."""
    module, _, name = dotted.rpartition(".")

    def setstate(self: Any, state: Any) -> None:
        self.__dict__["state"] = state

    return type(name, (), {"__module__": module, "__setstate__": setstate, "__qualname__": name})


def read_checkpoint(
    path: str | os.PathLike, *, allow: Sequence[Any] = (), stand_ins: Iterable[str] = ()
) -> Any:
    """`torch.load(path, weights_only=True)` on CPU, with extra globals allowed.

    allow: classes or functions the pickle may name beyond torch's safe set (e.g. `set`).
    stand_ins: dotted names of metadata classes (e.g. "omegaconf.dictconfig.DictConfig") that
        unpickle as inert placeholders instead of importing their package.
    Zip checkpoints are memory-mapped, so a GB-sized file costs no copy until its tensors are used.
    """
    path = Path(path)
    extra = list(allow) + [(_stand_in(name), name) for name in stand_ins]
    try:
        with torch.serialization.safe_globals(extra):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ReleaseFormatError(
            f"cannot read the checkpoint {path}: {_load_failure(path, err)}. Is it the upstream file this "
            "model expects (see `musicssl info NAME`)? Download it again if it may be truncated."
        ) from err


def _load_failure(path: Path, err: BaseException) -> str:
    """torch's reason in one line. Its first line advises turning the weights-only unpickler off,
    which would not help a file that is no checkpoint at all, and is unsafe for one that is."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    # A zip's local-header magic (torch's format), or a pickle's protocol opcode (its legacy one).
    if head[:2] != b"PK" and head[:1] != b"\x80":
        return "it is not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    text = str(err) or type(err).__name__
    said = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    return (said[1] if said else text.splitlines()[0]).strip().rstrip(".")


def take(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def fold_weight_norm(state: dict[str, torch.Tensor], prefix: str, dim: int) -> dict[str, torch.Tensor]:
    """Replace a weight-normalised weight at `prefix` by the plain weight w = g * v / ||v||.

    Accepts both spellings: ``weight_g``/``weight_v`` (nn.utils.weight_norm) and
    ``parametrizations.weight.original0/1`` (parametrize). The norm is over every axis but `dim`.
    """
    for g_key, v_key in (("weight_g", "weight_v"),
                         ("parametrizations.weight.original0", "parametrizations.weight.original1")):
        if prefix + g_key in state:
            g, v = state.pop(prefix + g_key), state.pop(prefix + v_key)
            axes = [a for a in range(v.dim()) if a != dim % v.dim()]
            state[prefix + "weight"] = g * v / v.norm(dim=axes, keepdim=True)
            return state
    raise ReleaseFormatError(f"no weight-norm parameters at {prefix!r} (weight_g/weight_v or parametrizations)")


def pick_file(files: Mapping[str, Path], suffixes: Sequence[str], what: str) -> Path:
    """The one file in `files` whose name ends with one of `suffixes` (e.g. the checkpoint)."""
    found = [p for name, p in files.items() if name.endswith(tuple(suffixes))]
    if len(found) != 1:
        raise ReleaseFormatError(f"expected one {what} file ({'/'.join(suffixes)}) among {sorted(files)}")
    return Path(found[0])


# --- the cache of converted weights -------------------------------------------------------------
def source_key(spec: Any) -> str:
    """A short hash of everything that decides the converted weights: source, pins, architecture."""
    ident = {"weights": spec.weights, "revision": spec.revision, "files": spec.files, "args": spec.args}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def converted_folder(spec: Any) -> Path:
    """Where the converted release of a registry entry lives (it may not exist yet)."""
    return hub.cache_dir() / CONVERTED_DIR / spec.name / source_key(spec)


def convert_files(spec: Any, files: Mapping[str, Path]) -> Any:
    """Build `spec`'s architecture and load the upstream `files` ({name: path}) into it strictly."""
    from musicssl.factory import skip_weight_init
    from musicssl.registry import builder

    with skip_weight_init():  # every port's load_upstream loads strictly: each weight comes from `files`
        model = builder(spec.name)(**spec.args)
    model.load_upstream(dict(files))
    model.spec = spec
    return model.eval()


def provenance(spec: Any, files: Mapping[str, Path]) -> dict[str, Any]:
    """What a converted folder records about its source: the files' sha256 (recorded on first
    download when the registry pins none) and the upstream location."""
    return {
        "converted_from": spec.weights,
        "revision": spec.revision,
        "source_sha256": {name: hub.sha256_file(p) for name, p in files.items()},
        "pinned": bool(spec.files) and all(spec.files.values()),
    }


def load_converted(spec: Any, *, offline: bool | None = None) -> Any:
    """The encoder of an upstream registry entry: the cached conversion, or download + convert + cache."""
    from musicssl.factory import load_release, save_pretrained

    folder = converted_folder(spec)
    if _is_release(folder):
        try:
            model = load_release(folder)
        except ReleaseFormatError as err:  # cut short or altered: the upstream files are still cached
            log.warning("the converted copy of %s in %s is damaged (%s): converting it again", spec.name, folder, err)
            shutil.rmtree(folder, ignore_errors=True)
        else:
            model.spec = spec
            return model
    files = hub.fetch_spec_files(spec, offline=offline)
    model = convert_files(spec, files)
    try:
        _write_atomically(folder, lambda tmp: save_pretrained(
            model, tmp, name=spec.name, card=model_card(spec), provenance=provenance(spec, files)))
        log.info("converted %s from %s into %s", spec.name, spec.weights, folder)
    except OSError as err:  # a read-only cache: the model is good, only keeping it failed
        log.warning("cannot keep the converted %s in %s (%s): using it uncached, so every load converts it "
                    "again; point MUSICSSL_CACHE at a folder you may write to", spec.name, folder.parent,
                    err.strerror or err)
    return model


def _write_atomically(folder: Path, write: Any) -> None:
    """Write a folder under a temporary name, then rename it into place (no half-written cache).

    Processes that convert at once (the ranks of a torchrun job) each write their own; the first
    rename wins and the others keep it, so nobody deletes a folder another process is reading.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        write(tmp)
        if _is_release(folder):
            return
        if folder.exists():  # an incomplete folder, left by hand or by an older version
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError as err:  # another process renamed its copy in between
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not _is_release(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_release(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def model_card(spec: Any) -> str | None:
    """The weights card shipped with musicssl for this model, if any (its text, else None)."""
    path = Path(__file__).resolve().parent.parent / "weights_cards" / f"{spec.name}.md"
    return path.read_text() if path.is_file() else None


# --- `musicssl convert`: upstream files a user already holds -> a release folder -----------------
def _match_files(spec: Any, paths: Sequence[Path]) -> dict[str, Path]:
    """{expected upstream file name: path}: by file name where it matches, else in the order given."""
    expected = list(spec.files) or [p.name for p in paths]
    matched = {p.name: p for p in paths if p.name in expected}
    rest = [p for p in paths if p.name not in matched]
    for name in expected:
        if name not in matched and rest:
            matched[name] = rest.pop(0)
    if rest:
        raise ValueError(f"{spec.name} converts {expected}; got extra files {[str(p) for p in rest]}")
    return matched


def _candidates(name_or_family: str) -> list[Any]:
    """The upstream registry entries a `convert` argument names: one model, or all of a family."""
    from musicssl.errors import UnknownModelError
    from musicssl.registry import canonical, list_models, model_info

    try:
        spec = model_info(name_or_family)
    except UnknownModelError:
        specs = [model_info(n) for n in list_models(pretrained=False)]
        key = canonical(name_or_family)
        found = [s for s in specs if s.converted and (canonical(s.family) == key or canonical(s.name).startswith(key + "-"))]
        if not found:
            families = sorted({s.family for s in specs if s.converted})
            raise UnknownModelError(
                f"{name_or_family!r} is neither a model nor a family with upstream weights; "
                f"families: {families}; models: `musicssl list --verbose`."
            ) from None
        return found
    if not spec.converted:
        raise ValueError(f"{spec.name!r} is not a port of upstream weights, so there is nothing to convert: "
                         f"load it with musicssl.load({spec.name!r}); `musicssl list --verbose` shows the ports")
    return [spec]


def convert_local(name_or_family: str, paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> tuple[Any, Path]:
    """Convert upstream checkpoint files into a release folder at `out` (what `musicssl convert` runs).

    name_or_family: a registry name ("mert-v1-95m"), a family ("hubert") or a name prefix ("mert"):
    then each such model is tried and the first whose architecture the checkpoint fits is kept.
    Returns (the spec used, the folder).
    """
    from musicssl.bulk.outputs import make_out_dir
    from musicssl.factory import save_pretrained

    files = [Path(p) for p in paths]
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file (give the upstream checkpoint you downloaded)")
    make_out_dir(Path(out), "--out")  # before the conversion, not after it
    errors = []
    for spec in _candidates(name_or_family):
        try:
            matched = _match_files(spec, files)
            model = convert_files(spec, matched)
        except (ReleaseFormatError, ValueError) as err:
            errors.append(f"{spec.name}: {err}")
            continue
        prov = provenance(spec, matched)
        prov["converted_from"] = [str(p) for p in files]
        return spec, save_pretrained(model, out, name=spec.name, card=model_card(spec), provenance=prov)
    raise ReleaseFormatError(f"{[str(p) for p in files]} fit no model of {name_or_family!r}:\n  " + "\n  ".join(errors))
