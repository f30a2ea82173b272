"""Upstream checkpoints -> musicssl: safe reading, key helpers, and the converted-weights cache.

A ported family reads the upstream files in its encoder's `load_upstream(files)` with
`read_checkpoint` (``torch.load(weights_only=True)`` plus an explicit allow-list, never a full
unpickle), maps the state dict with its module's `checkpoint_filter_fn`, and loads it strictly.
`load_converted` runs that once per pinned source and keeps the result as a release folder under
``<cache>/converted/``, so a second load reads safetensors only: no network, no pickle, no conversion.
"""

from __future__ import annotations

import dataclasses
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
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import torch

from musicssl import hub
from musicssl.errors import ReleaseFormatError, first_line

if TYPE_CHECKING:
    from musicssl.models.base import Encoder
    from musicssl.registry import ModelSpec

log = logging.getLogger(__name__)

# Raised when a port's conversion changes what it writes, so that copies made before convert again.
CONVERSION = 1
# Beside a cached conversion: its model.safetensors' sha256 and identity, and CONVERSION (JSON).
WEIGHTS_SHA256 = "model.safetensors.sha256"
# Beside an unpinned port's conversions: the commit and sha256 of its first download.
FIRST_FETCH = "first-download.json"


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
    # Bytes that are no pickle can break the unpickler anywhere (a WAV: IndexError from its stack).
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, IndexError, KeyError, ValueError, TypeError) as err:
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
    said = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(err))
    return (said[1] if said else first_line(err)).strip().rstrip(".")


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
            if prefix + v_key not in state:
                raise ReleaseFormatError(f"{prefix + g_key!r} without {prefix + v_key!r}: the weight norm is half there")
            g, v = state.pop(prefix + g_key), state.pop(prefix + v_key)
            axes = [a for a in range(v.dim()) if a != dim % v.dim()]
            state[prefix + "weight"] = g * v / v.norm(dim=axes, keepdim=True)
            return state
    raise ReleaseFormatError(f"no weight-norm parameters at {prefix!r} (weight_g/weight_v or parametrizations); "
                             f"{key_outline(state)}")


# Where training code nests the state dict beside its other entries (epoch, optimizer, ...).
_WRAPPERS = ("state_dict", "model", "module", "model_state_dict")


def unwrap_state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict of tensors in a checkpoint as training code saves it: plain, under one of
    _WRAPPERS beside other entries (Lightning's "state_dict", "model"), and with DDP's "module."
    prefix removed; anything else is refused, naming the file."""
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is not None:
            obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ReleaseFormatError(f"{path} holds {'an empty dict' if obj == {} else 'a ' + type(obj).__name__}, "
                                 "not a state dict of tensors")
    odd = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise ReleaseFormatError(f"{path}: the entries {odd[:3]} are {type(obj[odd[0]]).__name__}s, not tensors: "
                                 "give the file that holds the model's state dict")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def key_outline(state: Mapping[str, Any]) -> str:
    """A line on what a state dict holds: its keys' first components, which name a wrapper or head."""
    heads: dict[str, int] = {}
    for k in state:
        heads[k.split(".", 1)[0]] = heads.get(k.split(".", 1)[0], 0) + 1
    shown = ", ".join(f"{h!r} ({n})" for h, n in sorted(heads.items(), key=lambda kv: -kv[1])[:6])
    return f"the file's {len(state)} keys start with {shown}{', ...' if len(heads) > 6 else ''}"


def pick_file(files: Mapping[str, Path], suffixes: Sequence[str], what: str) -> Path:
    """The one file in `files` whose name ends with one of `suffixes` (e.g. the checkpoint)."""
    found = [p for name, p in files.items() if name.endswith(tuple(suffixes))]
    if len(found) != 1:
        given = sorted(str(p) for p in files.values())
        raise ReleaseFormatError(f"expected one {what} file ({'/'.join(suffixes)}) among the files given {given}")
    return Path(found[0])


# --- the cache of converted weights -------------------------------------------------------------
def source_key(spec: ModelSpec) -> str:
    """A short hash of everything that decides the converted weights: source, pins, architecture."""
    ident = {"weights": spec.weights, "revision": spec.revision, "files": spec.files, "args": spec.args}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def converted_folder(spec: ModelSpec) -> Path:
    """Where the converted release of a registry entry lives (it may not exist yet)."""
    return hub.cache_dir() / hub.CONVERTED_DIR / spec.name / source_key(spec)


def convert_files(spec: ModelSpec, files: Mapping[str, Path]) -> Encoder:
    """Build `spec`'s architecture and load the upstream `files` ({name: path}) into it strictly."""
    from musicssl.factory import skip_weight_init
    from musicssl.registry import builder

    with skip_weight_init():  # every port's load_upstream loads strictly: each weight comes from `files`
        model = builder(spec.name)(**spec.args)
    model.load_upstream(dict(files))
    model.spec = spec
    return model.eval()


def provenance(spec: ModelSpec, files: Mapping[str, Path], sha256: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What a converted folder records about its source: the files' sha256 (`sha256` when already
    hashed), the upstream location, and whether every file is one the registry pins."""
    sha256 = sha256 or {name: hub.sha256_file(p) for name, p in files.items()}
    return {
        "converted_from": spec.weights,
        "revision": spec.revision,
        "source_sha256": dict(sha256),
        "pinned": bool(spec.files) and all(_is_pinned(spec, name, sha256[name]) for name in files),
    }


def _is_pinned(spec: ModelSpec, name: str, sha256: str) -> bool:
    """Whether a file given as `spec`'s upstream `name` is the one it pins, or the pinned archive's
    checkpoint (a family's `pinned_members`)."""
    pin = spec.files.get(name)
    return pin is not None and sha256 in (pin, _pinned_members(spec).get(name))


def _pinned_members(spec: ModelSpec) -> dict[str, str]:
    """The family's `Encoder.pinned_members` (none for a family this musicssl does not know)."""
    from musicssl.registry import family_class, is_family

    return family_class(spec.family).pinned_members if is_family(spec.family) else {}


def load_converted(spec: ModelSpec, *, offline: bool | None = None) -> Encoder:
    """The encoder of an upstream registry entry: the cached conversion, or download + convert + cache."""
    from musicssl.factory import load_release, save_pretrained

    folder = converted_folder(spec)
    if _is_release(folder):
        try:
            _check_weights_sha256(folder)
            model = load_release(folder)
        except ReleaseFormatError as err:  # cut short or altered: the upstream files are still cached
            log.warning("the converted copy of %s in %s is damaged (%s): converting it again", spec.name, folder, err)
            shutil.rmtree(folder, ignore_errors=True)
        else:
            model.spec = spec
            return model
    files = hub.fetch_spec_files(_first_fetch(spec), offline=offline)
    _record_first_fetch(spec, files)
    model = convert_files(spec, files)
    try:
        _write_atomically(folder, lambda tmp: _keep_sha256(save_pretrained(
            model, tmp, name=spec.name, card=model_card(spec), provenance=provenance(spec, files))))
        log.info("converted %s from %s into %s", spec.name, spec.weights, folder)
    except OSError as err:  # a read-only cache: the model is good, only keeping it failed
        log.warning("cannot keep the converted %s in %s (%s): using it uncached, so every load converts it "
                    "again; point MUSICSSL_CACHE at a folder you may write to", spec.name, folder.parent,
                    err.strerror or err)
    return model


def _first_fetch(spec: ModelSpec) -> Any:
    """`spec` pinned to the commit and sha256 its files had when first downloaded, where the
    registry pins neither (a Hub branch that moves later is not followed; trust on first use)."""
    try:
        record = json.loads(_record_path(spec).read_text())
        commit, sha256 = record["commit"], record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return spec
    if record.get("weights") != spec.weights or record.get("revision") != spec.revision:
        return spec  # the registry moved the entry since: the record is of another source
    log.debug("%s: taking the files first downloaded, from commit %s", spec.name, commit)
    files = {name: pin or sha256.get(name) for name, pin in spec.files.items()}
    return dataclasses.replace(spec, revision=spec.revision or commit, files=files)


def _record_first_fetch(spec: ModelSpec, files: Mapping[str, Path]) -> None:
    """Keep the commit and sha256 of an unpinned Hub port's first download (see _first_fetch)."""
    path = _record_path(spec)
    pinned = bool(spec.files) and all(spec.files.values())  # a sha256 per file: nothing to trust on first use
    if pinned or not (spec.weights or "").startswith("hf-hub:") or not files or path.exists():
        return
    commits = {hub.snapshot_commit(p, name) for name, p in files.items()}
    if len(commits) != 1 or None in commits:
        return
    record = {"weights": spec.weights, "revision": spec.revision, "commit": commits.pop(),
              "sha256": {name: hub.file_sha256(p) for name, p in files.items()}}
    try:
        from musicssl.bulk.outputs import atomic_write

        atomic_write(path, lambda f: f.write(json.dumps(record, indent=2).encode() + b"\n"))
    except OSError as err:  # a read-only cache: the next conversion follows the branch again
        log.debug("cannot record the first download of %s in %s: %s", spec.name, path, err)


def _record_path(spec: ModelSpec) -> Path:
    return hub.cache_dir() / hub.CONVERTED_DIR / spec.name / FIRST_FETCH


def _keep_sha256(folder: Path) -> None:
    weights = folder / "model.safetensors"
    st = weights.stat()
    record = {"sha256": hub.sha256_file(weights), "size": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns,
              "conversion": CONVERSION}
    (folder / WEIGHTS_SHA256).write_text(json.dumps(record) + "\n")


def _check_weights_sha256(folder: Path) -> None:
    """Refuse a cached conversion whose weights are not those it wrote, or that an older converter
    made. The file keeps the size, inode and mtime it was written with (a rename changes none), so
    the check is a stat, and the sha256 is read again only when they differ: a cache that may not
    be written to (a shared, read-only one) costs no hashing either. A copy from before these
    records (no file) is taken as it is."""
    try:
        record = json.loads((folder / WEIGHTS_SHA256).read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as err:
        raise ReleaseFormatError(f"{WEIGHTS_SHA256} is unreadable ({err})") from err
    if not isinstance(record, dict) or record.get("conversion", 0) < CONVERSION:
        raise ReleaseFormatError("it was made by an older converter")
    st = (folder / "model.safetensors").stat()
    if [st.st_size, st.st_ino, st.st_mtime_ns] == [record.get("size"), record.get("ino"), record.get("mtime_ns")]:
        return
    actual = hub.sha256_file(folder / "model.safetensors")
    if actual != record.get("sha256"):
        raise ReleaseFormatError(f"model.safetensors has sha256 {actual[:12]}, not the "
                                 f"{str(record.get('sha256'))[:12]} it was written with")


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


def model_card(spec: ModelSpec) -> str | None:
    """The weights card shipped with musicssl for this model, if any (its text, else None)."""
    path = Path(__file__).resolve().parent.parent / "weights_cards" / f"{spec.name}.md"
    return path.read_text() if path.is_file() else None


# --- `musicssl convert`: upstream files a user already holds -> a release folder -----------------
def _match_files(spec: ModelSpec, paths: Sequence[Path]) -> dict[str, Path]:
    """{expected upstream file name: path}: by file name where it matches, then by extension (a
    renamed file keeps its kind), then in the order given."""
    if any(_SHARD.search(p.name) for p in paths):
        raise ValueError("a sharded checkpoint (an index and its -0000N-of-0000M parts) is not read: merge it "
                         "into one file first, e.g. load it with transformers and save_pretrained(DIR, "
                         "max_shard_size='20GB')")
    expected = list(spec.files) or [p.name for p in paths]
    matched = {p.name: p for p in paths if p.name in expected}
    rest = [p for p in paths if p.name not in matched]
    for name in expected:
        kind = [p for p in rest if p.suffix == Path(name).suffix]
        if name not in matched and len(kind) == 1:
            matched[name] = kind[0]
            rest.remove(kind[0])
    for name in expected:
        if name not in matched and rest:
            matched[name] = rest.pop(0)
    if rest:
        raise ValueError(f"{spec.name} converts {expected}; got extra files {[str(p) for p in rest]}")
    return matched


_SHARD = re.compile(r"-\d{5}-of-\d{5}\.|\.index\.json$")


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
    then each such model is tried, those whose pinned sha256 or file names the files match first,
    and the first whose architecture the checkpoint fits is kept. Files that are not the ones the
    registry pins (a fine-tune, other weights of that shape) convert with a warning, and the
    release says so. Returns (the spec used, the folder).
    """
    from musicssl.bulk.outputs import make_out_dir
    from musicssl.factory import check_release_out, save_pretrained

    files, out = [Path(p).expanduser() for p in paths], Path(out).expanduser()
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: {'a folder' if p.is_dir() else 'no such file'} (give the upstream "
                                    "checkpoint files you downloaded)")
    check_release_out(out, "--out", files)
    make_out_dir(out, "--out")  # before the conversion, not after it
    sha = {p: hub.sha256_file(p) for p in files}
    candidates, errors = _candidates(name_or_family), []
    for spec in sorted(candidates, key=lambda s: _evidence(s, files, sha), reverse=True):
        try:
            matched = _match_files(spec, files)
            model = convert_files(spec, matched)
        except (ReleaseFormatError, ValueError) as err:
            errors.append(f"{spec.name}: {err}")
            continue
        prov = provenance(spec, matched, {name: sha[p] for name, p in matched.items()})
        prov["converted_from"] = [str(p) for p in files]
        _say_what_it_is(spec, matched, sha, candidates, files)
        card = model_card(spec)
        if not prov["pinned"] and spec.files and all(spec.files.values()) and card is not None:
            card = _with_note(card, _other_weights_note(spec, matched, sha))
        return spec, save_pretrained(model, out, name=spec.name, card=card, provenance=prov)
    raise ReleaseFormatError(f"{[str(p) for p in files]} fit no model of {name_or_family!r}:\n  " + "\n  ".join(errors))


def _evidence(spec: ModelSpec, files: Sequence[Path], sha: Mapping[Path, str]) -> tuple[int, int]:
    """How well `files` match a registry entry: (files with a sha256 it pins, files with a name it expects)."""
    pins = set(spec.files.values()) | set(_pinned_members(spec).values())
    return sum(sha[p] in pins for p in files), sum(p.name in spec.files for p in files)


def _say_what_it_is(spec: ModelSpec, matched: Mapping[str, Path], sha: Mapping[Path, str], candidates: Sequence[ModelSpec],
                    files: Sequence[Path]) -> None:
    """Warn where the files are not the ones `spec` pins, or where nothing told apart entries of the
    same architecture (MusicFM's MSD and FMA checkpoints)."""
    for name, p in matched.items():
        pin = spec.files.get(name)
        if pin and not _is_pinned(spec, name, sha[p]):
            log.warning("%s is not the %s that %s pins (sha256 %s, pinned %s): converted with %s's architecture "
                        "as other weights of that shape (a fine-tune, or another model); the release records "
                        "pinned: false", p, name, spec.name, sha[p][:12], pin[:12], spec.name)
    alike = [s.name for s in candidates if s is not spec and s.family == spec.family and s.args == spec.args]
    if alike and _evidence(spec, files, sha) == (0, 0):
        log.warning("the files fit %s and %s alike, and neither their names nor their sha256 tell which: converted "
                    "as %s; name the model (`musicssl convert %s ...`) to choose", spec.name, ", ".join(alike),
                    spec.name, alike[0])


def _with_note(card: str, note: str) -> str:
    """`card` with `note` first after its YAML front matter (which must open the file)."""
    end = card.find("\n---\n", 4) if card.startswith("---\n") else -1
    at = end + len("\n---\n") if end != -1 else 0
    return card[:at] + ("\n" if at else "") + note + card[at:]


def _other_weights_note(spec: ModelSpec, matched: Mapping[str, Path], sha: Mapping[Path, str]) -> str:
    """A note heading the card of a release converted from files that are not the pinned ones."""
    held = ", ".join(f"{p.name} (sha256 {sha[p]})" for p in matched.values())
    return (f"> **Other weights.** This release was converted from {held}, not from the files that "
            f"{spec.name} pins: it has {spec.name}'s architecture, but the training data, evaluation and "
            "figures below describe the upstream weights, not these.\n\n")
