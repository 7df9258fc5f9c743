"""Repo ids as users type them (`org/name`, `org/name@revision`, `org/name/path/in/repo`), read from the
local Hugging Face cache, never from the network.

huggingface_hub keeps what it downloaded in one folder (`cache_folder`), one folder per repo:

    models--org--name/
        refs/main                  the commit that the revision `main` named when it was downloaded (40 hex digits)
        snapshots/<commit>/...     the repo's files at that commit, only those that were downloaded (a download
                                   with allow_patterns leaves a partial snapshot), each a relative symlink ...
        blobs/<sha256 or sha1>     ... to its contents here (a newer client links a blob on again, into the
                                   cache-wide shared store <cache>/blobs/<2 hex>/<xet hash>: followed alike)
        .no_exist/<commit>/<file>  files that the Hub said the repo does not have at that commit

Reading it needs no hub library and no network: directories, symlinks and a refs/ file. Nothing here opens a
socket, so HF_HUB_OFFLINE means nothing to us: every run is offline. `resolve_model` is the one call every flag
that takes a model makes: an existing local path always wins; otherwise the repo id is looked up here.
The grammar is huggingface_hub's `hf://` URIs (its `parse_hf_uri`), which is also accepted with that prefix.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

# huggingface_hub's own rules (utils/_validators.py REPO_ID_REGEX, constants.REGEX_COMMIT_HASH, and the
# revisions that hold a "/" in utils/_hf_uris.py).
NAME = re.compile(r"\b[\w\-.]{1,96}\b", re.ASCII)        # one side of "namespace/name"
COMMIT = re.compile(r"[0-9a-f]{40}")
SPECIAL_REVISION = re.compile(r"^refs/(?:convert/[\w.-]+|pr/\d+)")
PREFIXES = ("hf://models/", "hf://")                      # the URI form of a model repo id


class HubCacheError(ValueError):
    """A repo id that cannot be read from the cache; the message says why and what to run."""


@dataclass(frozen=True)
class RepoPath:
    repo_id: str                 # "org/name"
    revision: str | None         # from "@revision", None when not given
    path_in_repo: str            # "" for the whole repo


def cache_folder() -> tuple[Path, str]:
    """The cache folder and how it was chosen, with huggingface_hub's precedence (constants.py):
    $HF_HUB_CACHE, else its older name $HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub; `~` and `$VARS` expanded as it does."""
    def expand(text: str) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(text)))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return expand(os.environ[name]), f"${name}"
    if os.environ.get("HF_HOME"):
        return expand(os.environ["HF_HOME"]) / "hub", "$HF_HOME/hub"
    if os.environ.get("XDG_CACHE_HOME"):
        return expand(os.environ["XDG_CACHE_HOME"]) / "huggingface" / "hub", "$XDG_CACHE_HOME/huggingface/hub"
    return expand("~/.cache/huggingface/hub"), "the default; set HF_HUB_CACHE or HF_HOME to look elsewhere"


def repo_folder_name(repo_id: str) -> str:
    """models--org--name (huggingface_hub's repo_folder_name for a model repo)."""
    return "--".join(["models", *repo_id.split("/")])


def _escapes(path: str) -> bool:
    """A relative path inside a repo may not climb out of it or start from the root."""
    return path.startswith("/") or "\\" in path or any(part in ("", ".", "..") for part in path.split("/"))


def parse_repo_path(text: str) -> RepoPath | None:
    """`org/name[@revision][/path/in/repo]` (or the same after `hf://`) as huggingface_hub splits it, or
    None when `text` is no repo id. (A revision or path that would leave the cache is refused by `lookup`.)"""
    location = text
    for prefix in PREFIXES:
        if location.startswith(prefix):
            location = location[len(prefix):]
            break
    location = location.rstrip("/")
    at = location.find("@")
    if at == -1 or location[:at].count("/") > 1:    # an "@" further on belongs to a file name
        revision = None
        parts = location.split("/", 2)
        if len(parts) < 2:
            return None
        repo_id, path = f"{parts[0]}/{parts[1]}", parts[2] if len(parts) > 2 else ""
    else:
        repo_id, rest = location[:at], location[at + 1:]
        special = SPECIAL_REVISION.match(rest)
        revision, path = ((special.group(), rest[special.end():].removeprefix("/")) if special
                          else (rest.split("/", 1) + [""])[:2])
        revision = unquote(revision)
    namespace, _, name = repo_id.partition("/")
    if not (NAME.fullmatch(namespace) and NAME.fullmatch(name)) or "--" in repo_id or ".." in repo_id \
            or repo_id.endswith(".git"):
        return None
    return RepoPath(repo_id, revision, path)


def check_inside(what: str, value: str | None, repo_id: str) -> None:
    """A revision or a path in a repo names something inside the repo's cache folder, never outside it."""
    if value is not None and _escapes(value):
        raise HubCacheError(f"refused: {what} {value!r} of {repo_id} has an empty, '.', '..' or absolute "
                            "component, and a repo id never reaches outside the Hugging Face cache")


def resolve_model(value: str | Path, *, flag: str | None = None, revision: str | None = None,
                  weights_name: str | None = None) -> Path:
    """What a flag that takes a model names, as a local path: `value` itself when it exists (with
    `weights_name`: that file in it); otherwise the repo id's folder or file in the Hugging Face cache
    at `revision` (--revision, or `@revision` in the id; default main), its links checked. Raises
    HubCacheError (a ValueError), its message one line, prefixed with `flag value:` when `flag` is given.
    `revision` is for repo ids only: a local path is read as it is (as diffusers does)."""
    try:
        return _resolve(str(value), revision, weights_name)
    except HubCacheError as e:
        raise HubCacheError(f"{flag} {value}: {e}" if flag else str(e)) from None


def _resolve(value: str, revision: str | None, weights_name: str | None) -> Path:
    if weights_name is not None and _escapes(weights_name):
        raise HubCacheError(f"--weights_name {weights_name!r}: a file name inside the model's folder, without "
                            "'..' or absolute components")
    local = Path(value)
    if local.exists():
        if weights_name is None:
            return local
        if not local.is_dir() and local.as_posix().endswith(f"/{weights_name}"):
            return local     # resolved already (a run config records the resolved value with the flag)
        if not local.is_dir():
            raise HubCacheError(f"--weights_name {weights_name}: needs a folder (or a repo id), and this is a file")
        if not (local / weights_name).exists():
            raise HubCacheError(f"--weights_name {weights_name}: no such file in this folder "
                                f"(it holds: {_listing(local)})")
        return local / weights_name
    repo = parse_repo_path(value)
    if repo is None:
        raise HubCacheError("no such file or folder, and not a repo id of the Hugging Face cache "
                            "(org/name, org/name@revision or org/name/file)")
    if revision is not None and repo.revision is not None and revision != repo.revision:
        raise HubCacheError(f"the revision @{repo.revision} in the repo id and --revision {revision} disagree")
    path = "/".join(p for p in (repo.path_in_repo, weights_name) if p)
    return lookup(repo.repo_id, revision or repo.revision, path)


def lookup(repo_id: str, revision: str | None, path: str = "") -> Path:
    """`path` (a file or folder; "" for the whole snapshot) of `repo_id` at `revision` (default main) in
    the cache, as huggingface_hub's try_to_load_from_cache finds it, every link in it checked."""
    check_inside("the revision", revision, repo_id)
    check_inside("the path", path or None, repo_id)
    cache, how = cache_folder()
    folder = cache / repo_folder_name(repo_id)
    wanted = revision or "main"
    command = _download_command(repo_id, revision, path)
    if not folder.is_dir():
        near = _near_names(cache, folder.name)
        raise HubCacheError(
            f"no such file or folder, and {repo_id} is not in the Hugging Face cache (looked in {cache}, {how}"
            + (f"; it holds {', '.join(near)}: repo ids are case-sensitive here" if near else "")
            + f"). Nothing is downloaded here: on a connected machine run {command} (or `huggingface-cli download "
            f"...` with older clients) and copy its cache folder {folder.name} into {cache}")
    if COMMIT.fullmatch(wanted):
        commit, named_by = wanted, None
    else:
        ref = folder / "refs" / wanted
        if not ref.is_file():
            raise HubCacheError(f"revision {wanted} of {repo_id} is not in the Hugging Face cache ({folder}); "
                                f"{_cached_revisions(folder)}. On a connected machine run {command}")
        commit, named_by = ref.read_text(encoding="utf-8", errors="replace").strip(), ref
        if not COMMIT.fullmatch(commit):
            raise HubCacheError(f"{ref}: not a commit hash ({commit[:60]!r}); the cache entry is damaged: run "
                                f"{command} again on a connected machine")
    snapshot = folder / "snapshots" / commit
    if not snapshot.is_dir():
        what = f"{named_by.relative_to(folder)} names commit {commit}, but" if named_by else f"commit {commit}:"
        raise HubCacheError(f"{what} no file of it is in the Hugging Face cache ({snapshot} is missing); "
                            f"{_cached_revisions(folder)}. On a connected machine run {command}")
    target = snapshot / path if path else snapshot
    if not os.path.lexists(target):
        if (folder / ".no_exist" / commit / path).is_file():
            raise HubCacheError(f"{target}: the Hub said that {repo_id} has no file {path} at commit {commit}")
        where = target.parent if target.parent.is_dir() else snapshot
        raise HubCacheError(f"{target}: not in the Hugging Face cache, which holds only some of {repo_id}'s files "
                            f"at commit {commit} ({where} holds: {_listing(where)}). On a connected machine run "
                            f"{_download_command(repo_id, commit if revision is None else revision, path)}")
    check_links(target, repo_id=repo_id, command=command)
    return target


def check_links(path: Path, *, repo_id: str, command: str) -> None:
    """Every symlink in `path` (a file, or a folder walked whole) must reach a file: a snapshot's file
    whose blob is gone is named with the blob, and with the `.incomplete` file an interrupted
    download leaves beside it."""
    links = [path] if not path.is_dir() else [Path(root) / name for root, dirs, files in os.walk(path)
                                               for name in sorted(dirs + files)]
    for link in links:
        if os.path.islink(link) and not link.exists():
            missing = _missing_target(link)
            partial = Path(f"{missing}.incomplete")
            raise HubCacheError(
                f"{link}: a broken link in the Hugging Face cache: its blob {missing} is missing"
                + (f", and {partial.name} beside it is what an interrupted download left" if partial.exists() else "")
                + f". On a connected machine run {command} again: it fetches the missing blob of {repo_id}")


def _missing_target(link: Path) -> str:
    """The first target along a chain of symlinks that does not exist (a snapshot file -> its blob -> the
    shared store's entry)."""
    here = str(link)
    for _ in range(40):
        if not os.path.islink(here):
            return here
        there = os.path.normpath(os.path.join(os.path.dirname(here), os.readlink(here)))
        if not os.path.lexists(there):
            return there
        here = there
    return f"{here} (a loop of symlinks)"


def cache_hint(path: str | Path) -> str:
    """For a message about a file missing from a folder: when the folder lies in a snapshot of the cache,
    " (...)" saying that the cache holds only part of the repo and what fetches the rest; else ""."""
    parts = Path(os.path.abspath(path)).parts
    for i in range(len(parts) - 2):
        kind, *names = parts[i].split("--")
        if kind == "models" and len(names) == 2 and parts[i + 1] == "snapshots" and COMMIT.fullmatch(parts[i + 2]):
            repo_id, commit, inside = "/".join(names), parts[i + 2], "/".join(parts[i + 3:])
            return (f" (a partial download: the Hugging Face cache holds only some of {repo_id}'s files at commit "
                    f"{commit}; on a connected machine run `hf download {repo_id} "
                    + (f"--include '{inside}/*' " if inside else "") + f"--revision {commit}`)")
    return ""


def _download_command(repo_id: str, revision: str | None, path: str) -> str:
    return "`hf download " + " ".join([repo_id, *([path] if path else []),
                                        *(["--revision", revision] if revision else [])]) + "`"


def _listing(folder: Path, limit: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return (", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")) or "nothing"


def _cached_revisions(folder: Path) -> str:
    """'cached: main -> 1a2b3c4d5e6f, v1.0 -> ...; other commits: <40 hex>' for an error message."""
    refs = folder / "refs"
    named = {}
    for ref in sorted(refs.rglob("*")) if refs.is_dir() else []:
        if ref.is_file():
            named[ref.relative_to(refs).as_posix()] = ref.read_text(encoding="utf-8", errors="replace").strip()
    snapshots = sorted(p.name for p in (folder / "snapshots").iterdir()) if (folder / "snapshots").is_dir() else []
    others = [c for c in snapshots if c not in named.values()]
    parts = [", ".join(f"{name} -> {commit[:12]}" for name, commit in named.items())] if named else []
    parts += [f"other commits: {', '.join(others)}"] if others else []
    return "cached: " + "; ".join(parts) if parts else "no revision of it is cached"


def _near_names(cache: Path, name: str) -> list[str]:
    """Cached repos whose folder name differs from `name` in case only."""
    if not cache.is_dir():
        return []
    return sorted(p.name for p in cache.iterdir() if p.name.lower() == name.lower() and p.name != name)
